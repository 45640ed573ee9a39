//! The fleet tier against a real SeaweedFS: two or three kvsnap instances sharing one bucket.
//! Several daemons run at once here, so each gets one thread (`-t 1`) of the two cores.

mod common;

use common::Daemon;
use common::weed::Weed;
use serde_json::{Value, json};
use uuid::Uuid;

const ARGS: [&str; 6] = ["-c", "4096", "-np", "2", "-t", "1"];

/// A fleet member: its own redb file, the shared bucket under `prefix`.
struct Member {
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

fn member(weed: &Weed, prefix: &str, durability: &str) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let url = weed.url(prefix);
    let mut args = ARGS.to_vec();
    args.extend(["--remote", &url, "--remote-durability", durability]);
    let daemon = Daemon::start_with_env(dir.path(), &data, &args, &weed.env());
    Member { daemon, _dir: dir }
}

fn prompt() -> String {
    format!(
        "A story told in turns. {}",
        common::long_prose(260).trim_end()
    )
}

/// One turn of `session`: the generated token ids and text. Sampled (temperature 0.8): with a
/// seed the stream starts there, without one it continues the conversation's own stream.
async fn turn(d: &Daemon, session: &str, prompt: &str, seed: Option<u64>) -> (Vec<i64>, String) {
    let mut body = json!({"prompt": prompt, "session_id": session, "n_predict": 24,
                          "temperature": 0.8, "return_tokens": true});
    if let Some(seed) = seed {
        body["seed"] = json!(seed);
    }
    let reply = d.ok("/completion", body).await;
    let tokens = reply["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    (tokens, reply["content"].as_str().unwrap().to_string())
}

async fn health(d: &Daemon) -> Value {
    d.get_json("/health").await
}

#[tokio::test]
async fn a_conversation_continues_exactly_on_another_instance_after_a_kill_9() {
    let weed = Weed::start("kvsnap-fleet").await;
    let a = member(&weed, "one", "remote-sync");
    let first = prompt();
    // The uninterrupted conversation, for reference, on A.
    let reference = Uuid::new_v4().to_string();
    let (_, text) = turn(&a.daemon, &reference, &first, Some(7)).await;
    let second = format!("{first}{text} And then?");
    let (expected, _) = turn(&a.daemon, &reference, &second, None).await;

    // The same conversation, interrupted: A dies right after the first turn's reply.
    let session = Uuid::new_v4().to_string();
    let (_, moved_text) = turn(&a.daemon, &session, &first, Some(7)).await;
    assert_eq!(moved_text, text);
    a.daemon.kill_9();

    let b = member(&weed, "one", "remote-sync");
    let (continued, _) = turn(&b.daemon, &session, &second, None).await;
    assert_eq!(
        continued, expected,
        "B continues the conversation A saved, token for token and with its random stream"
    );
    assert_eq!(b.daemon.metric("kvsnap_remote_fetches_total").await, 1.0);
    assert_eq!(health(&b.daemon).await["status"], "ok");
    // B saved its turn back: a third instance finds B's version.
    let info_b = b.daemon.get_json(&format!("/v1/sessions/{session}")).await;
    let c = member(&weed, "one", "remote-sync");
    let info_c = c.daemon.get_json(&format!("/v1/sessions/{session}")).await;
    assert_eq!(info_c["tokens"], info_b["tokens"]);
    assert_eq!(info_c["checksum"], info_b["checksum"]);
}

#[tokio::test]
async fn a_damaged_page_in_the_bucket_is_refused_and_never_loaded() {
    let weed = Weed::start("kvsnap-damage").await;
    let a = member(&weed, "two", "remote-sync");
    let session = Uuid::new_v4().to_string();
    turn(&a.daemon, &session, &prompt(), Some(3)).await;
    drop(a);
    assert!(weed.damage_pages("two").await > 0);

    let b = member(&weed, "two", "async");
    let (status, body) = b
        .daemon
        .post(
            "/completion",
            json!({"prompt": "Go on.", "session_id": session, "n_predict": 4}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("does not match its id"), "{message}");
    // Nothing of it was kept: B lists no conversation, and asking again is refused again.
    let listed = b.daemon.get_json("/v1/sessions").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");
    let (status, _) = b
        .daemon
        .post(&format!("/v1/sessions/{session}/save"), json!({}))
        .await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn an_older_copy_cannot_overwrite_a_newer_conversation_in_the_bucket() {
    let weed = Weed::start("kvsnap-stale").await;
    let a = member(&weed, "three", "remote-sync");
    let session = Uuid::new_v4().to_string();
    let first = prompt();
    let (_, text) = turn(&a.daemon, &session, &first, Some(5)).await;

    // B takes the conversation further.
    let b = member(&weed, "three", "remote-sync");
    let longer = format!("{first}{text} Later, on B.");
    turn(&b.daemon, &session, &longer, None).await;
    let on_b = b.daemon.get_json(&format!("/v1/sessions/{session}")).await;

    // A, still holding its older copy, takes another turn: its upload must not win.
    turn(
        &a.daemon,
        &session,
        &format!("{first}{text} Meanwhile on A."),
        None,
    )
    .await;
    let remote = weed.remote("three");
    let stored = remote
        .conversation(session.parse().unwrap())
        .await
        .unwrap()
        .expect("in the bucket");
    assert_eq!(
        serde_json::Value::from(stored.conversation.record.checksum),
        on_b["checksum"],
        "the bucket keeps B's newer conversation"
    );
    assert!(
        a.daemon
            .stderr()
            .contains("another instance continued this conversation"),
        "A says why it did not upload"
    );
}

#[tokio::test]
async fn a_bucket_that_goes_away_during_saves_loses_no_acknowledged_turn() {
    let mut weed = Weed::start("kvsnap-outage").await;
    let a = member(&weed, "four", "async");
    let session = Uuid::new_v4().to_string();
    let mut text = prompt();
    let (_, reply) = turn(&a.daemon, &session, &text, Some(11)).await;
    text.push_str(&reply);

    weed.stop();
    for i in 0..3 {
        text.push_str(&format!(" Turn {i}."));
        let (_, reply) = turn(&a.daemon, &session, &text, None).await;
        text.push_str(&reply);
    }
    // Serving went on from the local store; the bucket's failure shows.
    let mut degraded = Value::Null;
    for _ in 0..60 {
        degraded = health(&a.daemon).await;
        if degraded["status"] == "degraded" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(degraded["status"], "degraded", "{degraded}");
    assert!(degraded["remote"]["pending_uploads"].as_u64().unwrap() >= 1);
    assert!(a.daemon.metric("kvsnap_remote_upload_failures_total").await >= 1.0);

    weed.resume().await;
    let mut healthy = Value::Null;
    for _ in 0..120 {
        healthy = health(&a.daemon).await;
        if healthy["status"] == "ok" && healthy["remote"]["pending_uploads"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(healthy["status"], "ok", "{healthy}");
    let on_a = a.daemon.get_json(&format!("/v1/sessions/{session}")).await;
    a.daemon.kill_9();

    // Every acknowledged turn reached the bucket: another instance has exactly A's last one.
    let b = member(&weed, "four", "async");
    let on_b = b.daemon.get_json(&format!("/v1/sessions/{session}")).await;
    assert_eq!(on_b["tokens"], on_a["tokens"]);
    assert_eq!(on_b["checksum"], on_a["checksum"]);
}
