//! Manifests (`Manifest::decode`) and the assembly of a state from one. The first byte
//! chooses whether the rest is a whole manifest or a body framed with a valid checksum.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;
#[path = "../inputs.rs"]
#[allow(dead_code)]
mod inputs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::manifest_input(data));
