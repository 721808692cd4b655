//! steerd: node-level traffic steering for Kubernetes.
//!
//! The flow: [`sources`] (files, Kubernetes) → [`model`] (typed Istio + Kubernetes config) →
//! [`compile`] (pure: config → routing plan) → [`dataplane`] (BPF maps) → [`admin`]/[`cli`].

//!
//! Without the default `agent` feature only the configuration pipeline is built (model,
//! compile, and the parts of [`sources`] that need no I/O): what the fuzz targets exercise.

#[cfg(feature = "agent")]
pub mod admin;
#[cfg(feature = "agent")]
pub mod cli;
pub mod compile;
#[cfg(feature = "agent")]
pub mod dataplane;
#[cfg(feature = "agent")]
pub mod metrics;
pub mod model;
pub mod sources;
