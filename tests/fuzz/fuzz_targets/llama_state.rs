//! llama.cpp's memory section (`llama_state::parse`) under each set of parse options (the
//! first byte chooses them), and everything done with a section once it parsed.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;
#[path = "../inputs.rs"]
#[allow(dead_code)]
mod inputs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::llama_state_input(data));
