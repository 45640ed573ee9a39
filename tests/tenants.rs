//! Tenants see all and only their own conversations: the listing among thousands of others',
//! and every route tried with another key on a conversation, which answers as if it did not
//! exist and shares no page with it.

mod common;

use common::Daemon;
use kvsnap::store::Store;
use kvsnap::store::records::{RECORD_VERSION, SessionRecord};
use serde_json::Value;
use uuid::Uuid;

const MINE: &str = "my-key";
const THEIRS: &str = "their-key";

fn owner(key: &str) -> Option<String> {
    Some(blake3::hash(key.as_bytes()).to_hex().to_string())
}

fn record(owner: Option<String>, last_used_ms: u64) -> SessionRecord {
    SessionRecord {
        record_version: RECORD_VERSION,
        owner,
        created_ms: last_used_ms,
        last_used_ms,
        tokens: 1,
        bytes: 1,
        chunks: 1,
        checksum: blake3::hash(b"x").to_hex().to_string(),
        model: "test".into(),
        damaged: None,
        compute_profile: None,
        saves: 0,
    }
}

async fn page(d: &Daemon, key: &str, offset: usize, limit: usize) -> Vec<String> {
    let body: Value = d
        .client
        .get(d.url(&format!("/v1/sessions?offset={offset}&limit={limit}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_user_among_busy_tenants_lists_all_and_only_their_own_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    // Seven of mine, older than 2,000 of theirs.
    let mut mine = Vec::new();
    {
        let store = Store::open(&data).unwrap();
        for i in 0..7u64 {
            let id = Uuid::new_v4();
            store
                .put_whole_for_tests(id, &record(owner(MINE), 1_000 + i), b"x", true)
                .unwrap();
            mine.push(id.to_string());
        }
        for i in 0..2_000u64 {
            store
                .put_whole_for_tests(
                    Uuid::new_v4(),
                    &record(owner(THEIRS), 10_000 + i),
                    b"x",
                    true,
                )
                .unwrap();
        }
    }
    mine.reverse(); // newest use first
    let d = Daemon::start_on(
        dir.path(),
        &data,
        &[
            "-c",
            "2048",
            "-np",
            "1",
            "--api-key",
            MINE,
            "--api-key",
            THEIRS,
        ],
    );

    let mut seen = Vec::new();
    for offset in [0, 3, 6, 9] {
        seen.extend(page(&d, MINE, offset, 3).await);
    }
    assert_eq!(seen, mine, "every one of mine, newest first, each once");
    let theirs = page(&d, THEIRS, 0, 1000).await;
    assert_eq!(theirs.len(), 1000);
    assert!(theirs.iter().all(|id| !mine.contains(id)));
    assert_eq!(page(&d, THEIRS, 1995, 1000).await.len(), 5);
}

/// The error sentence of an answer, with `id` replaced, so two answers about different
/// conversations compare.
async fn not_found_sentence(response: reqwest::Response, id: &str) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .replace(id, "ID");
    (status, message)
}

#[tokio::test]
async fn another_keys_conversation_answers_404_everywhere_and_shares_no_page() {
    const ADMIN: &str = "admin-key";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let mut d = Daemon::start_on(
        dir.path(),
        &data,
        &[
            "-c",
            "2048",
            "-np",
            "2",
            "--api-key",
            MINE,
            "--api-key",
            THEIRS,
            "--admin-api-key",
            ADMIN,
        ],
    );
    d.key = Some(MINE.into());
    let session = Uuid::new_v4().to_string();
    d.ok(
        "/completion",
        serde_json::json!({"prompt": "A private note: the safe's code is 4711.",
                           "n_predict": 2, "temperature": 0, "session_id": session}),
    )
    .await;
    let before = d.get_json(&format!("/v1/sessions/{session}")).await;
    let file = d
        .get_bytes(&format!("/v1/sessions/{session}/snapshot"))
        .await;
    let nobody = Uuid::new_v4().to_string();

    // Every route, as the other key, on my conversation and on one that does not exist.
    let attempts: Vec<(reqwest::Method, String, Option<Vec<u8>>)> = vec![
        (reqwest::Method::GET, "/v1/sessions/ID".into(), None),
        (reqwest::Method::DELETE, "/v1/sessions/ID".into(), None),
        (reqwest::Method::POST, "/v1/sessions/ID/save".into(), None),
        (
            reqwest::Method::POST,
            "/v1/sessions/ID/fork".into(),
            Some(b"{}".to_vec()),
        ),
        (
            reqwest::Method::GET,
            "/v1/sessions/ID/snapshot".into(),
            None,
        ),
        (reqwest::Method::GET, "/v1/sessions/ID/export".into(), None),
        (
            reqwest::Method::GET,
            "/v1/sessions/ID/export?format=llama".into(),
            None,
        ),
        (
            reqwest::Method::PUT,
            "/v1/sessions/ID/snapshot".into(),
            Some(file.clone()),
        ),
    ];
    for (method, path, body) in attempts {
        let mut answers = Vec::new();
        for id in [&session, &nobody] {
            let mut request = d
                .client
                .request(method.clone(), d.url(&path.replace("ID", id)))
                .bearer_auth(THEIRS);
            if let Some(body) = &body {
                request = request
                    .header("content-type", "application/json")
                    .body(body.clone());
            }
            answers.push(not_found_sentence(request.send().await.unwrap(), id).await);
        }
        // An upload to an id nobody holds creates a conversation; to mine it must not.
        if method == reqwest::Method::PUT {
            assert_eq!(answers[0].0, 404, "{method} {path}: {answers:?}");
            continue;
        }
        assert_eq!(answers[0].0, 404, "{method} {path}: {answers:?}");
        assert_eq!(
            answers[0], answers[1],
            "{method} {path} reveals the conversation exists"
        );
    }
    // A turn naming my conversation.
    let turn = serde_json::json!({"prompt": "A private note: the safe's code is",
                                  "n_predict": 2, "session_id": session});
    let answer = d
        .client
        .post(d.url("/completion"))
        .bearer_auth(THEIRS)
        .json(&turn)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    // Admin routes are not a user's.
    let answer = d
        .client
        .post(d.url(&format!("/admin/v1/sessions/{session}/migrate")))
        .bearer_auth(THEIRS)
        .json(&serde_json::json!({"target": "http://127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(answer.status().as_u16(), 401 | 403),
        "{}",
        answer.status()
    );
    // Nor is the listing.
    assert!(
        page(&d, THEIRS, 0, 100)
            .await
            .iter()
            .all(|id| id != &session)
    );

    // Mine is untouched.
    let after = d.get_json(&format!("/v1/sessions/{session}")).await;
    assert_eq!(after["checksum"], before["checksum"]);

    // The same bytes uploaded under the other key share no page with mine: nothing to time
    // or measure across owners.
    let theirs = Uuid::new_v4().to_string();
    let uploaded = d
        .client
        .put(d.url(&format!("/v1/sessions/{theirs}/snapshot")))
        .bearer_auth(THEIRS)
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 200);
    d.stop();
    let store = Store::open(&data).unwrap();
    let pages = |id: &str| {
        use kvsnap::store::SessionStore;
        let bytes = store
            .manifest(id.parse().unwrap())
            .unwrap()
            .expect("a manifest");
        kvsnap::snapshot::manifest::Manifest::decode(&bytes)
            .unwrap()
            .page_ids()
    };
    let (mine, theirs) = (pages(&session), pages(&theirs));
    assert!(!mine.is_empty());
    assert!(mine.iter().all(|p| !theirs.contains(p)));
}
