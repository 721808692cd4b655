//! Arbitrary bytes as a manifest file: YAML → model → validate → compile → analyze → explain.
//! Malformed YAML, wrong types and unknown kinds must come back as errors, never as a panic.
//! Seeded with Istio's samples (`cargo xtask test` passes `../shared/istio/samples`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The file source reads text; invalid UTF-8 is an I/O error there, so feed the nearest text.
    steerd_fuzz::pipeline(&String::from_utf8_lossy(data));
});
