//! The page store with the real model: a turn's save writes only the pages its tokens touched,
//! forks share every page and continue exactly, one owner's identical pages are stored once
//! and nothing is shared across owners, and deleting or trimming frees what nobody uses.

mod common;

use common::{Daemon, long_prose};
use kvsnap::store::{SessionStore, Store};
use serde_json::{Value, json};
use uuid::Uuid;

const ALICE: &str = "alice-key";
const BOB: &str = "bob-key";

fn args() -> Vec<&'static str> {
    vec![
        "-c",
        "8192",
        "-np",
        "2",
        "--api-key",
        ALICE,
        "--api-key",
        BOB,
    ]
}

async fn turn(d: &Daemon, key: &str, body: Value) -> Value {
    let response = d
        .client
        .post(d.url("/completion"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The daemon's count of page bytes written so far.
async fn page_bytes_written(d: &Daemon) -> u64 {
    d.metric("kvsnap_page_bytes_written_total").await as u64
}

#[tokio::test]
async fn a_turn_writes_only_the_pages_its_tokens_touched_and_forks_continue_exactly() {
    let mut d = Daemon::start(&args());
    // For /metrics; every other request here names its key.
    d.key = Some(ALICE.into());
    let session = Uuid::new_v4().to_string();
    let history = long_prose(700);
    let first = turn(
        &d,
        ALICE,
        json!({"prompt": history, "session_id": session, "n_predict": 8,
               "temperature": 0.8, "seed": 4, "return_tokens": true}),
    )
    .await;
    let before = page_bytes_written(&d).await;
    assert!(before > 0, "the first turn's save wrote pages");
    let described = d
        .client
        .get(d.url(&format!("/v1/sessions/{session}")))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let state_bytes = described["bytes"].as_u64().unwrap();

    // Fork now: the fork and the source continue the same way from here.
    let fork = d
        .client
        .post(d.url(&format!("/v1/sessions/{session}/fork")))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(fork.status(), 200);
    let fork: Value = fork.json().await.unwrap();
    let forked = fork["session_id"].as_str().unwrap().to_string();
    assert_ne!(forked, session);
    assert_eq!(fork["tokens"], described["tokens"], "{fork}");
    assert_eq!(
        page_bytes_written(&d).await,
        before,
        "a fork writes no page"
    );

    // A second turn of about 64 new tokens: only the pages they touch are written.
    let follow_up = format!(
        "{history}{} And then the keeper walked down to the harbour, where the boats lay in \
         rows and the nets dried in the wind, and he asked the oldest fisherman about the \
         storm that had come in the night before the last market day.",
        first["content"].as_str().unwrap()
    );
    let second = json!({"prompt": follow_up, "session_id": session, "n_predict": 12,
                        "temperature": 0.8, "return_tokens": true});
    let source_second = turn(&d, ALICE, second.clone()).await;
    let written = page_bytes_written(&d).await - before;
    assert!(written > 0);
    assert!(
        written * 3 < state_bytes,
        "a turn wrote {written} page bytes of a {state_bytes}-byte state"
    );

    let mut fork_second = second;
    fork_second["session_id"] = json!(forked);
    let fork_second = turn(&d, ALICE, fork_second).await;
    assert_eq!(
        fork_second["tokens"], source_second["tokens"],
        "the fork continues exactly as its source"
    );
    assert!(fork_second["timings"]["cache_n"].as_u64().unwrap() > 700);

    // The fork belongs to the source's owner.
    let other = d
        .client
        .get(d.url(&format!("/v1/sessions/{forked}")))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let stolen = d
        .client
        .post(d.url(&format!("/v1/sessions/{session}/fork")))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status(), 404);
    // A taken id, a bad body and an unknown source are refused with a sentence.
    let fork_into = |body: Value| {
        d.client
            .post(d.url(&format!("/v1/sessions/{session}/fork")))
            .bearer_auth(ALICE)
            .json(&body)
            .send()
    };
    assert_eq!(
        fork_into(json!({"session_id": forked}))
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        fork_into(json!({"session_id": "nope"}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(fork_into(json!({"into": "x"})).await.unwrap().status(), 400);
    let unknown = d
        .client
        .post(d.url(&format!("/v1/sessions/{}/fork", Uuid::new_v4())))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // The CLI forks too, and prints the new id.
    let (ok, stdout, stderr) =
        common::cli(&["fork", &session, "--server", &d.base, "--key", ALICE]);
    assert!(ok, "{stderr}");
    assert!(Uuid::parse_str(stdout.trim()).is_ok(), "{stdout}");
}

#[tokio::test]
async fn pages_are_shared_within_an_owner_never_across_and_freed_when_unused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let system = long_prose(800);
    // Named conversations only: with checkpoints kept (tests/unnamed.rs), the store would
    // rightly hold their pages after every conversation is deleted.
    let mut only_named = args();
    only_named.extend(["--keep-unnamed", "off"]);
    let d = Daemon::start_on(dir.path(), &data, &only_named);
    let mut sessions = Vec::new();
    for (key, question) in [
        (ALICE, "Who kept the lighthouse?"),
        (ALICE, "What did the merchants sell?"),
        (BOB, "Who kept the lighthouse?"),
        (ALICE, "What did the children dare?"),
    ] {
        let session = Uuid::new_v4().to_string();
        turn(
            &d,
            key,
            json!({"prompt": format!("{system}\nQuestion: {question}\nAnswer:"),
                   "session_id": session, "n_predict": 4, "temperature": 0}),
        )
        .await;
        sessions.push((key, session));
    }
    // Alice's last conversation trimmed back: a prompt that parts early keeps only the
    // common prefix, and its save no longer references the tail's pages.
    turn(
        &d,
        ALICE,
        json!({"prompt": "A different story altogether.", "session_id": sessions[3].1,
               "n_predict": 2, "temperature": 0}),
    )
    .await;
    d.stop();

    let store = Store::open(&data).unwrap();
    assert_eq!(store.check().unwrap(), Vec::<String>::new());
    let stats = store.page_stats().unwrap();
    assert!(
        stats.references > stats.pages,
        "alice's two conversations share their common prefix's pages: {stats:?}"
    );
    // Bob's pages are his alone: every page he references is referenced once.
    let bob = Uuid::parse_str(&sessions[2].1).unwrap();
    let alice = Uuid::parse_str(&sessions[1].1).unwrap();
    let alice_first = Uuid::parse_str(&sessions[0].1).unwrap();
    let pages_of = |id: Uuid| {
        let manifest =
            kvsnap::snapshot::manifest::Manifest::decode(&store.manifest(id).unwrap().unwrap())
                .unwrap();
        manifest.page_ids()
    };
    let bobs = pages_of(bob);
    assert!(
        pages_of(alice).iter().all(|id| !bobs.contains(id)),
        "no page is shared across owners, even for identical rows"
    );
    let trimmed = Uuid::parse_str(&sessions[3].1).unwrap();
    assert!(
        pages_of(trimmed).len() <= 2,
        "the trimmed conversation references only its new short history's pages"
    );
    for id in [alice, alice_first, bob, trimmed] {
        assert!(store.delete(id).unwrap());
    }
    let empty = store.page_stats().unwrap();
    assert_eq!((empty.pages, empty.references), (0, 0), "{empty:?}");
    assert_eq!(store.check().unwrap(), Vec::<String>::new());
}
