//! Durable conversations against the real model, a real redb file and real restarts:
//! restart continuity, `kill -9` after a save, more conversations than sequences, damaged and
//! mismatched snapshots, owners, and the session routes.

mod common;

use common::{Daemon, long_prose};
use kvsnap::sessions::paging;
use kvsnap::snapshot::Snapshot;
use kvsnap::store::{SessionStore, Store};
use serde_json::{Value, json};
use uuid::Uuid;

const ARGS: [&str; 4] = ["-c", "8192", "-np", "2"];

/// One conversation: two turns, the second continuing the first's text.
struct Script {
    history: String,
    first: Value,
    second: Value,
}

impl Script {
    fn new(history: String, first: Value, second: Value) -> Script {
        Script {
            history,
            first,
            second,
        }
    }

    fn turn(&self, template: &Value, prompt: String, session: &str) -> Value {
        let mut body = template.clone();
        body["prompt"] = json!(prompt);
        body["session_id"] = json!(session);
        body["return_tokens"] = json!(true);
        body
    }

    async fn first_turn(&self, d: &Daemon, session: &str) -> Value {
        d.ok(
            "/completion",
            self.turn(&self.first, self.history.clone(), session),
        )
        .await
    }

    async fn second_turn(&self, d: &Daemon, session: &str, first: &Value) -> Value {
        let prompt = format!(
            "{}{} And then",
            self.history,
            first["content"].as_str().unwrap()
        );
        d.ok("/completion", self.turn(&self.second, prompt, session))
            .await
    }
}

fn scripts() -> Vec<Script> {
    let greedy = json!({"n_predict": 12, "temperature": 0});
    vec![
        Script::new(
            "The old lighthouse keeper climbed the stairs and".into(),
            greedy.clone(),
            greedy.clone(),
        ),
        // With temperature: a seed on the first turn, the conversation's own stream after.
        Script::new(
            "A recipe for bread begins with".into(),
            json!({"n_predict": 12, "temperature": 0.9, "seed": 11}),
            json!({"n_predict": 12, "temperature": 0.9}),
        ),
        // Longer than the 512-token sliding window, with temperature.
        Script::new(
            long_prose(520),
            json!({"n_predict": 12, "temperature": 0.8, "seed": 3}),
            json!({"n_predict": 16, "temperature": 0.8}),
        ),
    ]
}

#[tokio::test]
async fn a_restarted_daemon_continues_every_conversation_exactly() {
    // The uninterrupted run.
    let reference = Daemon::start(&ARGS);
    let mut expected = Vec::new();
    for script in scripts() {
        let session = Uuid::new_v4().to_string();
        let first = script.first_turn(&reference, &session).await;
        let second = script.second_turn(&reference, &session, &first).await;
        expected.push((first, second));
    }
    drop(reference);

    // The same conversations, with a clean restart between the turns. Only the shutdown saves
    // them (`--persist shutdown`), so this also proves shutdown snapshots every conversation.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let mut args = ARGS.to_vec();
    args.extend(["--persist", "shutdown"]);
    let d = Daemon::start_on(dir.path(), &data, &args);
    let sessions: Vec<String> = (0..3).map(|_| Uuid::new_v4().to_string()).collect();
    let mut firsts = Vec::new();
    for (script, session) in scripts().iter().zip(&sessions) {
        firsts.push(script.first_turn(&d, session).await);
    }
    d.stop();
    let d = Daemon::start_on(dir.path(), &data, &args);
    for (i, (script, session)) in scripts().iter().zip(&sessions).enumerate() {
        assert_eq!(
            firsts[i]["tokens"], expected[i].0["tokens"],
            "script {i}, first turn"
        );
        let second = script.second_turn(&d, session, &firsts[i]).await;
        assert_eq!(
            second["tokens"], expected[i].1["tokens"],
            "script {i}, after restart"
        );
        let evaluated_before = firsts[i]["tokens_evaluated"].as_u64().unwrap();
        let cache_n = second["timings"]["cache_n"].as_u64().unwrap();
        assert!(
            cache_n >= evaluated_before,
            "script {i}: the history came from the snapshot ({cache_n} cached)"
        );
    }
}

#[tokio::test]
async fn kill_9_right_after_a_save_loses_nothing_that_was_saved() {
    let reference = Daemon::start(&ARGS);
    let script = &scripts()[1];
    let session = Uuid::new_v4().to_string();
    let first = script.first_turn(&reference, &session).await;
    let expected = script.second_turn(&reference, &session, &first).await;
    drop(reference);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    // Only explicit saves persist: the kill must not find anything else on disk.
    let mut args = ARGS.to_vec();
    args.extend(["--persist", "shutdown"]);
    let d = Daemon::start_on(dir.path(), &data, &args);
    let first = script.first_turn(&d, &session).await;
    let saved = d
        .ok(&format!("/v1/sessions/{session}/save"), json!({}))
        .await;
    assert_eq!(saved["state"], "resident");
    assert!(saved["bytes"].as_u64().unwrap() > 0);
    d.kill_9();

    let d = Daemon::start_on(dir.path(), &data, &args);
    let info: Value = d.get_json(&format!("/v1/sessions/{session}")).await;
    assert_eq!(info["state"], "stored");
    let second = script.second_turn(&d, &session, &first).await;
    assert_eq!(second["tokens"], expected["tokens"]);
    assert!(second["timings"]["cache_n"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn ten_conversations_on_three_sequences_match_a_roomy_run() {
    let run = |parallel: &'static str, ctx: &'static str, persist: &'static str| async move {
        let d = Daemon::start(&["-c", ctx, "-np", parallel, "--persist", persist]);
        let sessions: Vec<String> = (0..10).map(|_| Uuid::new_v4().to_string()).collect();
        let prompt = |i: usize| format!("Conversation {i}: the travellers reached the river and");
        let mut firsts = Vec::new();
        for (i, s) in sessions.iter().enumerate() {
            firsts.push(
                d.ok(
                    "/completion",
                    json!({"prompt": prompt(i), "n_predict": 8, "temperature": 0.7,
                            "seed": i, "session_id": s}),
                )
                .await,
            );
        }
        let mut seconds = Vec::new();
        for (i, s) in sessions.iter().enumerate() {
            let text = format!(
                "{}{} Later,",
                prompt(i),
                firsts[i]["content"].as_str().unwrap()
            );
            seconds.push(
                d.ok(
                    "/completion",
                    json!({"prompt": text, "n_predict": 8, "temperature": 0.7,
                            "session_id": s, "return_tokens": true}),
                )
                .await,
            );
        }
        seconds
    };
    // The tight run saves only when a conversation is evicted.
    let tight = run("3", "3072", "evict").await;
    let roomy = run("10", "10240", "turn").await;
    for i in 0..10 {
        assert_eq!(tight[i]["tokens"], roomy[i]["tokens"], "conversation {i}");
        assert!(
            tight[i]["timings"]["cache_n"].as_u64().unwrap() > 0,
            "conversation {i} was restored, not re-read"
        );
    }
}

#[tokio::test]
async fn damaged_or_mismatched_snapshots_get_their_4xx_and_nothing_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let d = Daemon::start_on(dir.path(), &data, &ARGS);
    let session = Uuid::new_v4().to_string();
    d.ok(
        "/completion",
        json!({"prompt": "The river was wide and", "n_predict": 6, "temperature": 0,
               "session_id": session}),
    )
    .await;
    let good = d
        .get_bytes(&format!("/v1/sessions/{session}/snapshot"))
        .await;
    let snapshot = Snapshot::decode(&good).expect("a downloaded snapshot decodes");
    // `kvsnap inspect` describes it.
    let file = dir.path().join("downloaded.kvsnap");
    std::fs::write(&file, &good).unwrap();
    let output = std::process::Command::new(common::binary())
        .arg("inspect")
        .arg(&file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains("kvsnap snapshot") && report.contains("checksum: valid"),
        "{report}"
    );

    let put = |bytes: Vec<u8>| {
        let target = Uuid::new_v4();
        d.client
            .put(d.url(&format!("/v1/sessions/{target}/snapshot")))
            .body(bytes)
            .send()
    };
    let expect = |status: u16, wanted: u16, body: Value, what: &str| {
        assert_eq!(status, wanted, "{what}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().len() > 20,
            "{what}: {body}"
        );
    };

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    let r = put(flipped).await.unwrap();
    expect(
        r.status().as_u16(),
        422,
        r.json().await.unwrap(),
        "bit flip",
    );

    let r = put(good[..good.len() - 100].to_vec()).await.unwrap();
    expect(
        r.status().as_u16(),
        422,
        r.json().await.unwrap(),
        "truncation",
    );

    let r = put(b"not a snapshot at all".to_vec()).await.unwrap();
    expect(r.status().as_u16(), 422, r.json().await.unwrap(), "garbage");

    let mut other_model = snapshot.clone();
    other_model.model.file_hash = "0".repeat(64);
    let r = put(other_model.encode().unwrap()).await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another model")
    );

    let mut other_types = snapshot.clone();
    other_types.layout.caches[0].layers[0].k_type = 8;
    let r = put(other_types.encode().unwrap()).await.unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    expect(status, 409, body.clone(), "other K/V types");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("q8_0"),
        "{body}"
    );

    let mut too_long = snapshot.clone();
    too_long.tokens = vec![1; 5000];
    let r = put(too_long.encode().unwrap()).await.unwrap();
    expect(
        r.status().as_u16(),
        409,
        r.json().await.unwrap(),
        "longer than the context",
    );

    let mut forged_state = snapshot.clone();
    let n = forged_state.sequence_state.len();
    forged_state.sequence_state.to_mut()[n / 3..n / 3 + 8].copy_from_slice(&[0xff; 8]);
    forged_state.sequence_state.to_mut().truncate(n - 16);
    let r = put(forged_state.encode().unwrap()).await.unwrap();
    expect(
        r.status().as_u16(),
        422,
        r.json().await.unwrap(),
        "state with a valid checksum",
    );

    // The good one is accepted, and its conversation continues.
    let r = put(good.clone()).await.unwrap();
    assert_eq!(r.status(), 200);

    // Damage in the store itself: the conversation answers 422, is kept, and is marked.
    d.stop();
    let victim = Uuid::parse_str(&session).unwrap();
    common::damage_first_page(&data, victim);
    let d = Daemon::start_on(dir.path(), &data, &ARGS);
    let (status, body) = d
        .post(
            "/completion",
            json!({"prompt": "The river was wide and", "n_predict": 2, "session_id": session}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let info: Value = d.get_json(&format!("/v1/sessions/{session}")).await;
    assert_eq!(info["state"], "damaged", "{info}");
    // Everyone else is still served.
    d.ok("/completion", json!({"prompt": "Hello", "n_predict": 2}))
        .await;
}

#[tokio::test]
async fn conversations_belong_to_the_key_that_made_them() {
    let d = Daemon::start(&[
        "-c",
        "4096",
        "-np",
        "2",
        "--api-key",
        "alice,bob",
        "--admin-api-key",
        "root",
    ]);
    let session = Uuid::new_v4().to_string();
    let turn = |key: &'static str| {
        d.client
            .post(d.url("/completion"))
            .bearer_auth(key)
            .json(&json!({"prompt": "Once", "n_predict": 2, "session_id": session}))
            .send()
    };
    assert_eq!(turn("alice").await.unwrap().status(), 200);
    assert_eq!(turn("bob").await.unwrap().status(), 404);
    let show = |key: &'static str| {
        d.client
            .get(d.url(&format!("/v1/sessions/{session}")))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(show("alice").await.unwrap().status(), 200);
    assert_eq!(show("bob").await.unwrap().status(), 404);
    assert_eq!(show("root").await.unwrap().status(), 200);
    let list = |key: &'static str| d.client.get(d.url("/v1/sessions")).bearer_auth(key).send();
    let bobs: Value = list("bob").await.unwrap().json().await.unwrap();
    assert_eq!(bobs["data"], json!([]));
    let alices: Value = list("alice").await.unwrap().json().await.unwrap();
    assert_eq!(alices["data"][0]["session_id"], json!(session));
    let delete = |key: &'static str| {
        d.client
            .delete(d.url(&format!("/v1/sessions/{session}")))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(delete("bob").await.unwrap().status(), 404);
    assert_eq!(delete("alice").await.unwrap().status(), 200);
    assert_eq!(show("alice").await.unwrap().status(), 404);
}

#[tokio::test]
async fn a_kill_9_loop_during_saves_leaves_every_acknowledged_save_whole() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let args = ["-c", "4096", "-np", "2", "--persist", "evict"];
    // (session, the prompt of its acknowledged save)
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for round in 0..5u64 {
        let d = Daemon::start_on(dir.path(), &data, &args);
        // Everything acknowledged before is stored whole and restores: replaying its prompt
        // reads the history from the snapshot.
        for (session, prompt) in &acknowledged {
            let reply = d
                .ok(
                    "/completion",
                    json!({"prompt": prompt, "n_predict": 1, "session_id": session}),
                )
                .await;
            assert!(
                reply["timings"]["cache_n"].as_u64().unwrap() > 0,
                "round {round}: {session} restored: {reply}"
            );
        }
        // New work, each conversation saved and acknowledged.
        for k in 0..2 {
            let session = Uuid::new_v4().to_string();
            let prompt = format!("Round {round} story {k}: {}", long_prose(150));
            d.ok(
                "/completion",
                json!({"prompt": prompt, "n_predict": 4, "temperature": 0, "session_id": session}),
            )
            .await;
            d.ok(&format!("/v1/sessions/{session}/save"), json!({}))
                .await;
            acknowledged.push((session, prompt));
        }
        // Then kill it while another conversation is being generated and saved.
        let racing = Uuid::new_v4().to_string();
        let client = d.client.clone();
        let (turn_url, save_url) = (
            d.url("/completion"),
            d.url(&format!("/v1/sessions/{racing}/save")),
        );
        tokio::spawn(async move {
            for _ in 0..20 {
                let _ = client
                    .post(&turn_url)
                    .json(&json!({"prompt": long_prose(200), "n_predict": 4,
                                  "session_id": racing}))
                    .send()
                    .await;
                let _ = client.post(&save_url).json(&json!({})).send().await;
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300 + 173 * round)).await;
        d.kill_9();
    }
    // Offline: every stored conversation is whole, no manifest points at a missing page, and
    // no page outlives its last reference.
    let store = Store::open(&data).unwrap();
    assert_eq!(store.check().unwrap(), Vec::<String>::new());
    let listed = store.list(100, &|_| true).unwrap();
    assert!(listed.len() >= acknowledged.len());
    for (id, record) in listed {
        let bytes = paging::stored_file(&store, id, &record).unwrap().unwrap();
        Snapshot::decode(&bytes).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

/// The snapshot body as the first file layout wrote it: the same fields, the state before the
/// creation time.
#[derive(serde::Serialize)]
struct FirstLayoutBody<'a> {
    format_version: u32,
    model: &'a kvsnap::snapshot::ModelIdentity,
    layout: &'a kvsnap::snapshot::LayoutIdentity,
    tokens: &'a [i32],
    sampling: &'a Option<kvsnap::snapshot::StoredSampling>,
    rng: &'a kvsnap::sampling::RngState,
    pending_token: Option<i32>,
    #[serde(with = "serde_bytes")]
    sequence_state: &'a [u8],
    created_unix_ms: u64,
}

/// A file written before the hash moved to the end: magic, blake3 of the body, body.
fn first_layout_file(snapshot: &Snapshot<'_>) -> Vec<u8> {
    let body = rmp_serde::to_vec_named(&FirstLayoutBody {
        format_version: snapshot.format_version,
        model: &snapshot.model,
        layout: &snapshot.layout,
        tokens: &snapshot.tokens,
        sampling: &snapshot.sampling,
        rng: &snapshot.rng,
        pending_token: snapshot.pending_token,
        sequence_state: &snapshot.sequence_state,
        created_unix_ms: snapshot.created_unix_ms,
    })
    .unwrap();
    let hash = blake3::hash(&body);
    [&kvsnap::snapshot::MAGIC_V1[..], hash.as_bytes(), &body].concat()
}

#[tokio::test]
async fn a_snapshot_in_the_first_file_layout_continues_exactly() {
    // Past the sliding window, with temperature: the conversation's own stream continues.
    let script = scripts().remove(2);
    let d = Daemon::start(&ARGS);
    let original = Uuid::new_v4().to_string();
    let first = script.first_turn(&d, &original).await;
    let file = d
        .get_bytes(&format!("/v1/sessions/{original}/snapshot"))
        .await;
    let snapshot = Snapshot::decode(&file).unwrap();
    assert_eq!(
        &file[..8],
        kvsnap::snapshot::MAGIC,
        "written in the current layout"
    );
    let expected = script.second_turn(&d, &original, &first).await;

    let old = first_layout_file(&snapshot);
    assert_eq!(Snapshot::decode(&old).unwrap(), snapshot);
    let copy = Uuid::new_v4().to_string();
    let r = d
        .client
        .put(d.url(&format!("/v1/sessions/{copy}/snapshot")))
        .body(old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let second = script.second_turn(&d, &copy, &first).await;
    assert_eq!(second["tokens"], expected["tokens"]);
    let cached = second["timings"]["cache_n"].as_u64().unwrap();
    assert!(
        cached >= first["tokens_evaluated"].as_u64().unwrap(),
        "the history came from the old file ({cached} cached)"
    );
}

/// A turn that ends on a stop string is a turn like any other: its reply ends only once it is
/// saved, and what is saved ends at the token that completed the stop string, whatever the
/// timing. (The reply used to end at the stop match, before the engine had even noticed it: a
/// `kill -9` right after the 200 lost the conversation, and three identical seeded turns stored
/// 10, 10 and 11 tokens.)
#[tokio::test]
async fn a_turn_that_ends_on_a_stop_string_is_saved_before_its_reply_ends() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let turn = |session: &str| {
        json!({"prompt": "Write three short sentences about the sea. The sea",
               "n_predict": 64, "temperature": 0.9, "seed": 5, "stop": ["."],
               "session_id": session, "return_tokens": true})
    };
    let mut stored = Vec::new();
    let mut replies = Vec::new();
    for round in 0..3 {
        let d = Daemon::start_on(dir.path(), &data, &ARGS);
        let session = Uuid::new_v4().to_string();
        let reply = d.ok("/completion", turn(&session)).await;
        assert_eq!(reply["stop_type"], "word", "round {round}: {reply}");
        assert_eq!(reply["stopping_word"], ".", "round {round}: {reply}");
        d.kill_9();

        let d = Daemon::start_on(dir.path(), &data, &ARGS);
        let info = d.get_ok_json(&format!("/v1/sessions/{session}")).await;
        let prompt_tokens = reply["timings"]["prompt_n"].as_u64().unwrap()
            + reply["timings"]["cache_n"].as_u64().unwrap();
        let generated = reply["tokens"].as_array().unwrap().len() as u64;
        // Everything up to the token that completed the stop string, which is not decoded.
        assert_eq!(
            info["tokens"].as_u64().unwrap(),
            prompt_tokens + generated - 1,
            "round {round}: {info} after {reply}"
        );
        stored.push(info["tokens"].clone());
        replies.push(reply["tokens"].clone());
        d.stop();
    }
    assert!(stored.windows(2).all(|w| w[0] == w[1]), "{stored:?}");
    assert!(replies.windows(2).all(|w| w[0] == w[1]), "{replies:?}");
}
