//! steerd: node-level traffic steering for Kubernetes.
//!
//! The flow: [`sources`] (files, Kubernetes) → [`model`] (typed Istio + Kubernetes config) →
//! [`compile`] (pure: config → routing plan) → [`dataplane`] (BPF maps) → [`admin`]/[`cli`].

pub mod admin;
pub mod cli;
pub mod compile;
pub mod dataplane;
pub mod metrics;
pub mod model;
pub mod sources;
