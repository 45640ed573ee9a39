//! Sealed blobs and sealed snapshot files (uploads may be sealed): opened only when unchanged,
//! never a panic.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;
#[path = "../inputs.rs"]
#[allow(dead_code)]
mod inputs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::sealed(data));
