//! Records the compute profile in the binary, and refuses builds that would not match it.
//!
//! The Makefile builds with `--config config/compute/NAME.toml`, which sets Rust's target CPU
//! and features, `KVSNAP_COMPUTE_PROFILE`, and the `GGML_*` options llama-cpp-sys-2 forwards to
//! llama.cpp's CMake. This script checks that those agree with the profile's definition in
//! `src/compute/profiles.rs`, and never allows `target-cpu=native` or AMX: a binary's numerics
//! must be the named, recorded choice it claims.

#[path = "src/compute/profiles.rs"]
#[allow(dead_code)]
mod profiles;

use std::env;

fn main() {
    for var in [
        "KVSNAP_COMPUTE_PROFILE",
        "CARGO_ENCODED_RUSTFLAGS",
        "GGML_AMX_TILE",
        "GGML_AMX_INT8",
        "GGML_AMX_BF16",
        "GGML_AVX512",
        "GGML_NATIVE",
        "GGML_CPU_REPACK",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=src/compute/profiles.rs");

    let rustflags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    // llama-cpp-sys-2 reads the first `target-cpu=` it finds; so does this check.
    let target_cpu = rustflags
        .split('\x1f')
        .find_map(|flag| flag.split("target-cpu=").nth(1))
        .map(str::to_string);
    let features: Vec<String> = env::var("CARGO_CFG_TARGET_FEATURE")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    let has = |feature: &str| features.iter().any(|f| f == feature);

    if target_cpu.as_deref() == Some("native") {
        fail(
            "target-cpu=native builds llama.cpp with GGML_NATIVE, which compiles ggml's AMX \
             kernels in on AMX hosts (they crash: llama.cpp #20824) and gives every host other \
             numerics. Build through the Makefile (`make build`, `make run PROFILE=...`) or \
             with `--config config/compute/NAME.toml`",
        );
    }
    if let Some(amx) = profiles::NEVER.iter().find(|f| has(f)) {
        fail(&format!(
            "the target feature {amx} is on: kvsnap never compiles AMX (llama.cpp #20824)"
        ));
    }
    for option in [
        "GGML_AMX_TILE",
        "GGML_AMX_INT8",
        "GGML_AMX_BF16",
        "GGML_NATIVE",
    ] {
        if env::var(option).is_ok_and(|v| is_on(&v)) {
            fail(&format!(
                "{option} is on: kvsnap never builds llama.cpp natively or with AMX"
            ));
        }
    }

    let name = match env::var("KVSNAP_COMPUTE_PROFILE") {
        Ok(name) => name,
        Err(_) => {
            println!(
                "cargo:warning=no compute profile chosen: this build is `{}`; build through \
                 the Makefile (or --config config/compute/NAME.toml) for a named profile",
                profiles::UNPINNED
            );
            emit(
                profiles::UNPINNED,
                target_cpu.as_deref().unwrap_or("x86-64"),
            );
            return;
        }
    };
    let Some(spec) = profiles::spec(&name) else {
        let known: Vec<&str> = profiles::PROFILES.iter().map(|p| p.name).collect();
        fail(&format!(
            "KVSNAP_COMPUTE_PROFILE={name} is not a compute profile; known: {}",
            known.join(", ")
        ));
    };
    if target_cpu.as_deref() != Some(spec.target_cpu) {
        fail(&format!(
            "profile {name} builds with target-cpu={}, but this build has {}; was RUSTFLAGS \
             set? It replaces the profile's flags",
            spec.target_cpu,
            target_cpu.as_deref().unwrap_or("none")
        ));
    }
    if let Some(missing) = spec.requires.iter().find(|f| !has(f)) {
        fail(&format!(
            "profile {name} needs the target feature {missing}, which this build lacks"
        ));
    }
    if let Some(extra) = spec.forbids.iter().find(|f| has(f)) {
        fail(&format!(
            "profile {name} must not have the target feature {extra}, which this build has"
        ));
    }
    // GGML_AVX512 has no Rust feature to follow: llama.cpp gets it from the environment only.
    let avx512 = env::var("GGML_AVX512").is_ok_and(|v| is_on(&v));
    if avx512 != has("avx512f") {
        fail(&format!(
            "profile {name}: GGML_AVX512 is {} but the Rust target {} AVX-512",
            if avx512 { "on" } else { "off" },
            if has("avx512f") { "has" } else { "lacks" }
        ));
    }
    emit(&name, spec.target_cpu);
}

fn emit(name: &str, target_cpu: &str) {
    // Weight repacking changes which kernels, and so which roundings, a build runs: a build
    // without it records its numerics under another name, so a conversation saved by one is
    // never called bit-exact on the other.
    let repack = env::var("GGML_CPU_REPACK").map_or(true, |v| is_on(&v));
    let numerics = if repack {
        name.to_string()
    } else {
        format!("{name}+unpacked")
    };
    println!("cargo:rustc-env=KVSNAP_COMPUTE_PROFILE={name}");
    println!("cargo:rustc-env=KVSNAP_NUMERICS={numerics}");
    println!("cargo:rustc-env=KVSNAP_TARGET_CPU={target_cpu}");
    println!(
        "cargo:rustc-env=KVSNAP_EXACT_BATCH_ROWS={}",
        exact_batch_rows(name, repack)
    );
}

/// The most generating sequences one decode call may hold while every row still goes through
/// the kernels it takes alone, measured with `make batch-probe` (docs/batch-invariance.md):
/// with weight repacking (llama.cpp's default), Q4_K weights run rows in groups of four through
/// a 4-row kernel that rounds otherwise than the one-row kernel: at most 3 (measured on both
/// profiles). Without it, K-quant rows take the one-row kernel until the tiled kernel starts at
/// 8 rows: at most 7 (measured on `avx512`). Anything not measured: one sequence per call.
fn exact_batch_rows(profile: &str, repack: bool) -> usize {
    match (profile, repack) {
        ("avx512" | "x86-64-v3", true) => 3,
        ("avx512", false) => 7,
        _ => 1,
    }
}

fn is_on(value: &str) -> bool {
    matches!(
        value.to_ascii_uppercase().as_str(),
        "ON" | "1" | "TRUE" | "YES"
    )
}

fn fail(message: &str) -> ! {
    eprintln!("kvsnap build: {message}");
    panic!("kvsnap build: {message}");
}
