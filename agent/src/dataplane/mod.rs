//! The kernel side: BPF programs and maps (and, later, the L7 proxy).

pub mod authz;
pub mod bpf;
pub mod cgroups;
pub mod egress;
pub mod gateway;
pub mod kernel;
pub mod maps;
pub mod pool;
pub mod proxy;
pub mod upstream;
pub mod upstream_tls;
pub mod workers;

pub use bpf::{Dataplane, DataplaneError, LoadOptions, Pins, cleanup};
