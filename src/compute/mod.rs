//! The compute profile: which instructions llama.cpp's kernels were compiled for.
//!
//! Kernels decide numerics: the same state continues with different tokens under different
//! instruction sets. So a profile is a named, recorded choice (`config/compute/NAME.toml`,
//! checked by `build.rs`), stored with every snapshot, and compared when a conversation is
//! restored, imported or moved: same profile, same tokens on any host; another profile, the
//! state is still valid but the continuation is not bit-exact, and the answer says so.

pub mod profiles;

use serde::Serialize;

/// The profile this binary was built for, as `config/compute/` and `profiles.rs` name it.
pub const PROFILE_NAME: &str = env!("KVSNAP_COMPUTE_PROFILE");
/// This build's numerics, as snapshots and records carry them: the profile's name, with
/// `+unpacked` when llama.cpp's weight repacking is off (other kernels, other roundings).
pub const THIS_BUILD: &str = env!("KVSNAP_NUMERICS");
/// The `target-cpu` it was built with (also llama.cpp's `-march`).
pub const TARGET_CPU: &str = env!("KVSNAP_TARGET_CPU");
/// The most generating sequences one decode call may hold with each row's logits exactly as
/// if it were decoded alone, for this build's kernels (`build.rs`, measured by `make
/// batch-probe`).
pub const EXACT_BATCH_ROWS: usize = match usize::from_str_radix(env!("KVSNAP_EXACT_BATCH_ROWS"), 10)
{
    Ok(rows) => rows,
    Err(_) => panic!("build.rs sets KVSNAP_EXACT_BATCH_ROWS to a number"),
};

/// Why this host cannot run this binary's profile, as a sentence; `None` when it can.
/// Checked before llama.cpp runs, so a host without the profile's instructions gets a sentence
/// and exit code 1 instead of SIGILL on the first decode.
pub fn host_mismatch() -> Option<String> {
    let spec = profiles::spec(PROFILE_NAME)?;
    let missing: Vec<&str> = spec
        .requires
        .iter()
        .copied()
        .filter(|feature| host_has(feature) == Some(false))
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "this kvsnap was built for compute profile {PROFILE_NAME}, and this CPU lacks {}; \
         build it for a profile this CPU runs (`make run PROFILE=x86-64-v3`)",
        missing.join(", ")
    ))
}

/// Whether this CPU has `feature` (Rust's spelling); `None` for a name this check does not know.
fn host_has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match feature {
            "sse4.2" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "f16c" => has!("f16c"),
            "bmi1" => has!("bmi1"),
            "bmi2" => has!("bmi2"),
            "lzcnt" => has!("lzcnt"),
            "movbe" => has!("movbe"),
            "avx512f" => has!("avx512f"),
            "avx512cd" => has!("avx512cd"),
            "avx512bw" => has!("avx512bw"),
            "avx512dq" => has!("avx512dq"),
            "avx512vl" => has!("avx512vl"),
            "avx512vnni" => has!("avx512vnni"),
            "avx512bf16" => has!("avx512bf16"),
            "avx512vbmi" => has!("avx512vbmi"),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        None
    }
}

/// Whether continuing a state here gives the tokens its writer would have given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exactness {
    /// The profile the state was written under; `None` when unknown (llama.cpp's own files,
    /// snapshots from before profiles were recorded).
    pub compute_profile: Option<String>,
    pub bit_exact: bool,
    /// Why not, as a sentence; absent when bit-exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exactness: Option<String>,
}

impl Exactness {
    /// A state written under `written` continued by a server running `running`.
    pub fn of(written: Option<&str>, running: &str) -> Self {
        let reason = match written {
            Some(profile) if profile == running && profile != profiles::UNPINNED => None,
            Some(profile) if profile == running => Some(format!(
                "it was written by a build with no named compute profile ({profile}), and so \
                 is this server: kvsnap cannot promise both were compiled alike"
            )),
            Some(profile) => Some(format!(
                "it was written under compute profile {profile} and continues under \
                 {running}: the state is valid, but the tokens may differ from what its writer \
                 would have produced"
            )),
            None => Some(format!(
                "it was written under an unknown compute profile (a llama.cpp file, or a \
                 kvsnap from before profiles were recorded) and continues under {running}: \
                 the state is valid, but the tokens may differ from what its writer would \
                 have produced"
            )),
        };
        Exactness {
            compute_profile: written.map(str::to_string),
            bit_exact: reason.is_none(),
            exactness: reason.map(|r| format!("not bit-exact: {r}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_named_profile_is_exact() {
        let same = Exactness::of(Some("avx512"), "avx512");
        assert!(same.bit_exact);
        assert_eq!(same.exactness, None);
    }

    #[test]
    fn another_or_unknown_profile_is_not_exact_and_says_why() {
        let other = Exactness::of(Some("x86-64-v3"), "avx512");
        assert!(!other.bit_exact);
        assert!(other.exactness.unwrap().contains("x86-64-v3"));
        let unknown = Exactness::of(None, "avx512");
        assert!(!unknown.bit_exact);
        assert!(
            unknown
                .exactness
                .unwrap()
                .contains("unknown compute profile")
        );
        assert!(!Exactness::of(Some("unpinned"), "unpinned").bit_exact);
    }

    #[test]
    fn every_profile_forbids_amx_and_needs_only_known_features() {
        for spec in profiles::PROFILES {
            for feature in spec.requires {
                assert!(!profiles::NEVER.contains(feature), "{}", spec.name);
                assert!(host_has(feature).is_some(), "{feature} is not checked");
            }
        }
    }
}
