//! llama.cpp's `ggsq` sequence files (`llama_file::parse_seq_file`).
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;
#[path = "../inputs.rs"]
#[allow(dead_code)]
mod inputs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::seq_file(data));
