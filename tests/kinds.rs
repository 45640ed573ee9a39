//! Every model kind kvsnap keeps, through every promise: saved, `kill -9`, restored and
//! continued with exactly the uninterrupted tokens (greedy and seeded), forked, moved to a
//! second instance, out to and in from llama.cpp's own `ggsq` file, and a damaged page refused
//! with 422. And a model whose state kvsnap cannot keep is refused at start with its reason.
//!
//! Gemma 3 (two caches, a sliding window) goes through these in `durable.rs`, `pages.rs`,
//! `migrate.rs` and `compat.rs`; here each further kind runs the whole list in one test:
//! SmolLM2 (one cache) in f16 and q4_0, Gemma in q8_0 with flash attention, and a tiny
//! random-weight Qwen2-VL (M-RoPE: cells with an extension), DeepSeek 2 (latent attention:
//! K rows only), Mamba and Mamba 2 (a recurrent state, no cache), LFM2 (a hybrid: a cache, then a
//! recurrent state) and Llama 4 (chunked attention, past its first chunk of 8,192).

mod common;

use std::path::{Path, PathBuf};

use common::{Daemon, long_prose};
use serde_json::{Value, json};
use uuid::Uuid;

/// One conversation of three turns, each continuing the last one's text.
struct Script {
    opening: String,
    /// The first turn's parameters (a seed, when sampled); later turns drop the seed and use
    /// the conversation's own random stream.
    first: Value,
    later: Value,
}

impl Script {
    /// The opening, then each reply as the token ids it was (a mixed prompt, as llama-server
    /// takes it) and a few words more: a reply's text tokenized again can merge with what
    /// follows into other tokens, and a recurrent model cannot cut its state back to a prefix.
    fn prompt(&self, replies: &[Value]) -> Value {
        let mut prompt = vec![json!(self.opening)];
        for reply in replies {
            prompt.extend(reply["tokens"].as_array().unwrap().iter().cloned());
            prompt.push(json!(" And then"));
        }
        Value::Array(prompt)
    }

    /// Turn `replies.len() + 1` of `session`.
    async fn turn(&self, d: &Daemon, session: &str, replies: &[Value]) -> Value {
        let mut body = if replies.is_empty() {
            self.first.clone()
        } else {
            self.later.clone()
        };
        body["prompt"] = self.prompt(replies);
        body["session_id"] = json!(session);
        body["return_tokens"] = json!(true);
        // The top candidates' probabilities too: equal tokens could hide unequal logits.
        body["n_probs"] = json!(3);
        d.ok("/completion", body).await
    }

    fn greedy(&self) -> bool {
        self.first["temperature"] == json!(0)
    }
}

/// Two openings of about `words` words each. 1,300 words are about 1,700 tokens: past Gemma's
/// 512-token sliding window, and past the 1,024 cells of its window cache, so the ring has
/// wrapped before the first save.
fn scripts(words: usize) -> Vec<Script> {
    vec![
        Script {
            opening: long_prose(words),
            first: json!({"n_predict": 12, "temperature": 0}),
            later: json!({"n_predict": 12, "temperature": 0}),
        },
        Script {
            opening: format!("{} A recipe for bread begins with", long_prose(words - 50)),
            first: json!({"n_predict": 12, "temperature": 0.9, "seed": 11}),
            later: json!({"n_predict": 12, "temperature": 0.9}),
        },
    ]
}

/// One thread each: the tests of this file run two at a time, and llama.cpp's threads spin
/// while they wait (two daemons of two threads on two cores take seconds a token).
fn start(dir: &Path, model: &Path, args: &[&str]) -> Daemon {
    let args = [args, &["-t", "1"]].concat();
    Daemon::try_start_model_on(dir, &dir.join("kvsnap.redb"), model, &args)
        .unwrap_or_else(|log| panic!("the daemon did not start:\n{log}"))
}

async fn fork(d: &Daemon, session: &str) -> String {
    let forked = d
        .ok(&format!("/v1/sessions/{session}/fork"), json!({}))
        .await;
    forked["session_id"].as_str().unwrap().to_string()
}

/// The turn took the `history` tokens read before from stored state, not read them again.
fn assert_restored(reply: &Value, history: u64, what: &str) {
    let cached = reply["timings"]["cache_n"].as_u64().unwrap();
    assert!(
        cached >= history,
        "{what}: restored {cached} of {history} tokens"
    );
}

/// What must be equal: the tokens and every step's top probabilities.
fn outcome(reply: &Value) -> (&Value, &Value) {
    (&reply["tokens"], &reply["completion_probabilities"])
}

/// The whole list for one model and its flags, on openings of 1,300 words.
async fn keeps_every_promise(model: &Path, args: &[&str]) {
    keeps_every_promise_over(model, args, 1300).await;
}

/// The whole list for one model and its flags, on openings of `words` words.
async fn keeps_every_promise_over(model: &Path, args: &[&str], words: usize) {
    // The uninterrupted run: three turns of each script on one daemon.
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = start(reference_dir.path(), model, args);
    let mut expected: Vec<Vec<Value>> = Vec::new();
    for script in scripts(words) {
        let session = Uuid::new_v4().to_string();
        let mut replies = Vec::new();
        for _ in 0..3 {
            let reply = script.turn(&reference, &session, &replies).await;
            let steps = reply["completion_probabilities"].as_array().map(Vec::len);
            assert_eq!(steps, Some(12), "every step's probabilities: {reply}");
            replies.push(reply);
        }
        expected.push(replies);
    }
    reference.stop();

    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = start(dir_a.path(), model, args);
    let sessions: Vec<String> = scripts(words)
        .iter()
        .map(|_| Uuid::new_v4().to_string())
        .collect();
    let mut forks = Vec::new();
    for ((script, session), expected) in scripts(words).iter().zip(&sessions).zip(&expected) {
        let first = script.turn(&a, session, &[]).await;
        assert_eq!(outcome(&first), outcome(&expected[0]), "first turn");
        forks.push(fork(&a, session).await);
    }
    // Every turn was saved when its reply ended (--persist turn): a kill loses nothing.
    a.kill_9();
    let a = start(dir_a.path(), model, args);
    for (i, script) in scripts(words).iter().enumerate() {
        let history = &expected[i][..1];
        for (who, session) in [("the conversation", &sessions[i]), ("its fork", &forks[i])] {
            let second = script.turn(&a, session, history).await;
            assert_eq!(
                outcome(&second),
                outcome(&expected[i][1]),
                "script {i}: {who} after kill -9"
            );
            let read_before = expected[i][0]["tokens_evaluated"].as_u64().unwrap();
            assert_restored(&second, read_before, &format!("script {i}: {who}"));
        }
    }

    // Moved: the snapshot file into a second instance on another store.
    let b = start(dir_b.path(), model, args);
    for (i, script) in scripts(words).iter().enumerate() {
        let file = a
            .get_bytes(&format!("/v1/sessions/{}/snapshot", sessions[i]))
            .await;
        let put = b
            .client
            .put(b.url(&format!("/v1/sessions/{}/snapshot", sessions[i])))
            .body(file)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
        let third = script.turn(&b, &sessions[i], &expected[i][..2]).await;
        assert_eq!(
            outcome(&third),
            outcome(&expected[i][2]),
            "script {i}: moved to a second instance"
        );
    }

    // Out to llama.cpp's own file and in again: the file holds no random stream, so only the
    // greedy conversation is held to its tokens; both must continue from the file's cache.
    for (i, script) in scripts(words).iter().enumerate() {
        let response = a
            .client
            .get(a.url(&format!("/v1/sessions/{}/export?format=llama", forks[i])))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let ggsq = response.bytes().await.unwrap().to_vec();
        assert_eq!(&ggsq[..4], b"qsgg", "llama.cpp's magic");
        let imported = b
            .client
            .post(b.url("/admin/v1/import/llama"))
            .body(ggsq.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(imported.status(), 200);
        let imported: Value = imported.json().await.unwrap();
        let session = imported["session_id"].as_str().unwrap().to_string();
        let back = b
            .client
            .get(b.url(&format!("/v1/sessions/{session}/export?format=llama")))
            .send()
            .await
            .unwrap();
        assert_eq!(back.bytes().await.unwrap().to_vec(), ggsq, "script {i}");
        let third = script.turn(&b, &session, &expected[i][..2]).await;
        // The second turn's whole prompt came from the file.
        let history = expected[i][1]["tokens_evaluated"].as_u64().unwrap();
        assert_restored(&third, history, &format!("script {i}: from the ggsq file"));
        if script.greedy() {
            assert_eq!(
                outcome(&third),
                outcome(&expected[i][2]),
                "script {i}: ggsq"
            );
        }
    }
    b.stop();

    // A page damaged on disk: the conversation answers 422 and is marked, others are served.
    a.stop();
    let victim = Uuid::parse_str(&sessions[0]).unwrap();
    common::damage_first_page(&dir_a.path().join("kvsnap.redb"), victim);
    let a = start(dir_a.path(), model, args);
    let (status, body) = a
        .post(
            "/completion",
            json!({"prompt": scripts(words)[0].prompt(&expected[0][..2]), "n_predict": 2,
                   "session_id": sessions[0]}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let info: Value = a.get_json(&format!("/v1/sessions/{}", sessions[0])).await;
    assert_eq!(info["state"], "damaged", "{info}");
    a.ok("/completion", json!({"prompt": "Hello", "n_predict": 2}))
        .await;
}

#[tokio::test]
async fn smollm2_keeps_every_promise() {
    keeps_every_promise(&common::smollm2_path(), &["-c", "8192", "-np", "2"]).await;
}

/// q4_0 K and V: the smallest blocks llama.cpp keeps a cache in.
#[tokio::test]
async fn smollm2_with_a_q4_0_cache_keeps_every_promise() {
    let args = [
        "-c", "8192", "-np", "2", "-fa", "on", "-ctk", "q4_0", "-ctv", "q4_0",
    ];
    keeps_every_promise(&common::smollm2_path(), &args).await;
}

/// q8_0 K and V: rows of 34-byte blocks, V by row (flash attention, which llama.cpp needs for a
/// quantized V), past the sliding window.
#[tokio::test]
async fn gemma_with_a_q8_0_cache_keeps_every_promise() {
    let args = [
        "-c", "4096", "-np", "2", "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0",
    ];
    keeps_every_promise(&common::model_path(), &args).await;
}

fn tiny(kind: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(kind, dir.path());
    (dir, model)
}

/// A tiny model of `kind`, written now, through the whole list.
async fn tiny_keeps_every_promise(kind: &str) {
    let (_dir, model) = tiny(kind);
    keeps_every_promise(&model, &["-c", "8192", "-np", "2"]).await;
}

/// Qwen2-VL's M-RoPE: every cell carries llama.cpp's 12-byte extension (x, y, token).
#[tokio::test]
async fn an_m_rope_model_keeps_every_promise() {
    tiny_keeps_every_promise("qwen2vl").await;
}

/// DeepSeek 2's multi-head latent attention: one compressed K row per token, no V.
#[tokio::test]
async fn a_latent_attention_model_keeps_every_promise() {
    tiny_keeps_every_promise("deepseek2").await;
}

/// Mamba: a recurrent model, whose memory is one running state per sequence and no KV cache.
#[tokio::test]
async fn a_recurrent_model_keeps_every_promise() {
    tiny_keeps_every_promise("mamba").await;
}

/// Mamba 2: a recurrent state of conv rows and per-head ssm states (the shape Granite 4's and
/// Falcon-H1's recurrent layers have).
#[tokio::test]
async fn a_mamba_2_model_keeps_every_promise() {
    tiny_keeps_every_promise("mamba2").await;
}

/// A recurrent state cannot be cut back to a shorter history. A conversation answered again
/// (its last prompt sent once more: a regenerated reply, an edited last message) goes back to
/// the state it kept at its previous turn's end, read from the store, instead of reading its
/// whole history again, and answers exactly as the first time: resident, after a kill -9, and
/// two turns back.
async fn goes_back_to_kept_turn_ends(model: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["-c", "8192", "-np", "2"];
    let d = start(dir.path(), model, &args);
    let script = &scripts(1300)[0];
    assert!(script.greedy());
    let session = Uuid::new_v4().to_string();
    let mut replies: Vec<Value> = Vec::new();
    for _ in 0..3 {
        let reply = script.turn(&d, &session, &replies).await;
        replies.push(reply);
    }
    // What a turn found held: the state the turn before it ended with.
    let held_before = |turn: usize| replies[turn]["timings"]["cache_n"].as_u64().unwrap();
    assert!(held_before(2) > held_before(1) && held_before(1) > 1000);
    let reply = script.turn(&d, &session, &replies[..2]).await;
    assert_eq!(outcome(&reply), outcome(&replies[2]), "the last turn again");
    assert_eq!(reply["timings"]["cache_n"].as_u64(), Some(held_before(2)));

    d.kill_9();
    let d = start(dir.path(), model, &args);
    let reply = script.turn(&d, &session, &replies[..2]).await;
    assert_eq!(outcome(&reply), outcome(&replies[2]), "again after kill -9");
    assert_eq!(reply["timings"]["cache_n"].as_u64(), Some(held_before(2)));
    let reply = script.turn(&d, &session, &replies[..1]).await;
    assert_eq!(
        outcome(&reply),
        outcome(&replies[1]),
        "the turn before again"
    );
    assert_eq!(reply["timings"]["cache_n"].as_u64(), Some(held_before(1)));
}

#[tokio::test]
async fn a_recurrent_conversation_answers_again_from_its_kept_turn_ends() {
    let (_dir, model) = tiny("mamba");
    goes_back_to_kept_turn_ends(&model).await;
}

#[tokio::test]
async fn a_hybrid_conversation_answers_again_from_its_kept_turn_ends() {
    let (_dir, model) = tiny("lfm2");
    goes_back_to_kept_turn_ends(&model).await;
}

/// LFM2: a hybrid, its convolution layers' recurrent state after its attention layers' cache.
#[tokio::test]
async fn a_hybrid_model_keeps_every_promise() {
    tiny_keeps_every_promise("lfm2").await;
}

/// Llama 4's chunked attention (chunks of 8,192 on three layers of four), which llama.cpp sets
/// in code: conversations of about 9,400 tokens, past a chunk boundary, so the window cache
/// holds only the current chunk (1,201 cells) when they are saved and restored. Read as no
/// window, as kvsnap read it before, each restore failed its position check (422).
#[tokio::test]
async fn a_chunked_attention_model_keeps_every_promise() {
    let (dir, model) = tiny("llama4");
    let args = ["-c", "24576", "-np", "2"];
    let d = start(dir.path(), &model, &args);
    let models = d.get_json("/v1/models").await;
    let meta = &models["data"][0]["meta"];
    assert_eq!(
        (&meta["n_swa"], &meta["window"]),
        (&json!(8192), &json!("chunked"))
    );
    d.stop();
    keeps_every_promise_over(&model, &args, 8200).await;
}

#[tokio::test]
async fn a_model_whose_state_cannot_be_kept_is_refused_at_start_and_served_with_persist_off() {
    // LFM2 with a window on every attention layer: llama.cpp writes a full-attention cache
    // with cells and no layers, which kvsnap does not keep yet.
    let (dir, model) = tiny("lfm2-window");
    let data = dir.path().join("kvsnap.redb");
    let refused = Daemon::try_start_model_on(dir.path(), &data, &model, &["-c", "1024"])
        .err()
        .expect("refused at start");
    assert!(
        refused.contains("kvsnap cannot keep the state of tiny-lfm2-window.gguf")
            && refused.contains("lfm2 is a hybrid model")
            && refused.contains("no layers")
            && refused.contains("--persist off"),
        "{}",
        common::last_lines(&refused, 5)
    );

    // The explicit choice: a plain server that keeps nothing and says so when asked to.
    let d = Daemon::try_start_model_on(
        dir.path(),
        &data,
        &model,
        &["-c", "1024", "--persist", "off"],
    )
    .unwrap_or_else(|log| panic!("--persist off did not start:\n{log}"));
    let reply = d
        .ok(
            "/completion",
            json!({"prompt": "Hello there", "n_predict": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(reply["tokens_predicted"], json!(4));
    let (status, body) = d
        .post(
            "/completion",
            json!({"prompt": "Hello there", "n_predict": 4,
                   "session_id": Uuid::new_v4().to_string()}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--persist off"),
        "{body}"
    );
    let (status, body) = d
        .post(&format!("/v1/sessions/{}/fork", Uuid::new_v4()), json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    d.stop();
}
