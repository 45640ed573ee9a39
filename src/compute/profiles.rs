//! The named compute profiles: which Rust target features each one compiles with.
//!
//! Plain data shared by two readers: `build.rs` (which refuses a build whose flags do not match
//! the profile it claims) and `compute` (which checks the host before llama.cpp runs). The
//! flags themselves live in `config/compute/NAME.toml`, which the Makefile hands to cargo.

/// One named profile.
pub struct ProfileSpec {
    pub name: &'static str,
    /// Rust's `target-cpu`, which llama-cpp-sys-2 also passes to llama.cpp as `-march`.
    pub target_cpu: &'static str,
    /// Target features the build must have on (Rust's spelling), so the host must have them.
    pub requires: &'static [&'static str],
    /// Target features the build must not have.
    pub forbids: &'static [&'static str],
}

/// Instruction sets never compiled in, whatever the profile: ggml's AMX kernels crash on
/// Sapphire-Rapids-class hosts (llama.cpp #20824).
pub const NEVER: &[&str] = &[
    "amx-tile",
    "amx-int8",
    "amx-bf16",
    "amx-fp16",
    "amx-complex",
];

const X86_64_V3: &[&str] = &[
    "sse4.2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe",
];

pub const PROFILES: &[ProfileSpec] = &[
    ProfileSpec {
        name: "x86-64-v3",
        target_cpu: "x86-64-v3",
        requires: X86_64_V3,
        forbids: &["avx512f"],
    },
    ProfileSpec {
        name: "avx512",
        target_cpu: "x86-64-v4",
        requires: &[
            "sse4.2",
            "popcnt",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "bmi1",
            "bmi2",
            "lzcnt",
            "movbe",
            "avx512f",
            "avx512cd",
            "avx512bw",
            "avx512dq",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avx512vbmi",
        ],
        forbids: &[],
    },
];

/// The profile called `name`.
pub fn spec(name: &str) -> Option<&'static ProfileSpec> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The name a build carries when no profile was chosen (`cargo build` without the Makefile):
/// llama.cpp then gets CMake's defaults, and no claim of exactness across hosts is made.
pub const UNPINNED: &str = "unpinned";
