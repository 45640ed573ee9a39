//! The module arrows ARCHITECTURE.md draws, held: a layer that must not know another does not
//! name it. (A `use` is how Rust code reaches a module; this reads every source file.)

use std::path::Path;

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                found.push((path.display().to_string(), text));
            }
        }
    }
    assert!(!found.is_empty(), "no sources under {dir}");
    found
}

fn assert_never_names(dir: &str, forbidden: &[&str]) {
    for (path, text) in sources(dir) {
        for name in forbidden {
            assert!(
                !text.contains(name),
                "{path} names {name}, which ARCHITECTURE.md says {dir} must not use"
            );
        }
    }
}

#[test]
fn the_engine_knows_no_store_and_no_sessions() {
    assert_never_names(
        "src/engine",
        &["crate::store", "crate::sessions", "crate::http"],
    );
}

#[test]
fn the_store_knows_no_engine() {
    assert_never_names(
        "src/store",
        &["crate::engine", "crate::sessions", "llama_cpp_2"],
    );
    assert_never_names(
        "migrations",
        &["crate::engine", "crate::sessions", "llama_cpp_2"],
    );
}

#[test]
fn snapshot_knows_neither_store_nor_http() {
    assert_never_names(
        "src/snapshot",
        &["crate::store", "crate::http", "redb::", "axum::"],
    );
}

#[test]
fn clients_of_the_api_do_not_reach_into_http() {
    assert_never_names("src/migrate", &["crate::http"]);
    assert_never_names("src/cli", &["crate::http"]);
}

/// The migrator is given its options (`MigratorOptions`), not the daemon's whole
/// configuration; the CLI knows neither the engine nor the configuration.
#[test]
fn migrate_and_cli_take_no_configuration_and_cli_no_engine() {
    assert_never_names("src/migrate", &["crate::config"]);
    assert_never_names(
        "src/cli",
        &["crate::config", "crate::engine", "crate::sessions"],
    );
}

/// `sessions/` reaches the engine through its handle and its port only: no llama.cpp.
#[test]
fn sessions_know_no_llama_cpp_and_no_http() {
    assert_never_names("src/sessions", &["llama_cpp_2", "crate::http"]);
}

#[test]
fn keys_know_nothing_of_where_blobs_go() {
    assert_never_names(
        "src/keys",
        &[
            "crate::store",
            "crate::sessions",
            "crate::engine",
            "crate::http",
            "redb::",
            "object_store",
        ],
    );
}

/// Handlers ask `sessions::Conversations` about a conversation, which makes the fleet's claim
/// first: none of them reaches the engine's conversation commands (or the claim) by hand.
#[test]
fn handlers_reach_conversations_only_through_the_service() {
    assert_never_names(
        "src/http",
        &[
            ".claim(",
            "engine.describe(",
            "engine.forget(",
            "engine.save(",
            "engine.fork(",
            "engine.export(",
            "engine.export_llama(",
            "engine.hold(",
            "engine.release(",
            "engine.drop_resident(",
        ],
    );
}

/// `http/error.rs` is the one place that picks an error's status: other handlers build their
/// refusals with its constructors.
#[test]
fn only_the_error_mapping_picks_error_statuses() {
    for (path, text) in sources("src/http") {
        if path.ends_with("error.rs") {
            continue;
        }
        assert!(
            !text.contains("ApiError::new("),
            "{path} builds an ApiError with a status of its own; add a constructor to error.rs"
        );
    }
}

/// The engine's error speaks of llama.cpp, requests and what its keeper reported, never of
/// the store or the bucket themselves.
#[test]
fn the_engines_error_knows_no_store_and_no_bucket() {
    for (path, text) in sources("src/engine") {
        for name in ["StoreError", "FleetError", "object_store", "Unavailable("] {
            assert!(!text.contains(name), "{path} names {name}");
        }
    }
}

/// Invariant 1: only the engine calls llama.cpp.
#[test]
fn only_the_engine_names_llama_cpp() {
    for dir in [
        "src/sessions",
        "src/http",
        "src/store",
        "src/snapshot",
        "src/migrate",
        "src/cli",
        "src/keys",
        "src/sampling",
    ] {
        assert_never_names(dir, &["llama_cpp_2", "llama_cpp_sys_2"]);
    }
}
