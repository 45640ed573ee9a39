//! Snapshot files: decoded, verified, cut into pages and assembled again. The first byte
//! chooses whether the rest is a whole file or a body framed with a valid checksum.
#![no_main]

use std::sync::LazyLock;

use kvsnap::snapshot::LiveIdentity;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;
#[path = "../inputs.rs"]
#[allow(dead_code)]
mod inputs;

static LIVE: LazyLock<LiveIdentity> = LazyLock::new(checks::live);

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::snapshot_input(data, &LIVE));
