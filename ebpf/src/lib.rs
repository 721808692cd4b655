//! Empty host-side library: the agent build-depends on this package so that cargo re-runs the
//! agent's build script (which compiles `src/main.rs` for the BPF target) when the programs change.
#![no_std]
