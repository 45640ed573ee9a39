//! The fleet tier against a real SeaweedFS: two or three kvsnap instances sharing one bucket.
//! Several daemons run at once here, so each gets one thread (`-t 1`) of the two cores.

mod common;

use common::Daemon;
use common::weed::Weed;
use serde_json::{Value, json};
use uuid::Uuid;

/// Leases of 2 s, so that taking over a dead or idle instance's conversations is quick.
const ARGS: [&str; 8] = ["-c", "4096", "-np", "2", "-t", "1", "--lease-seconds", "2"];

/// Until every lease taken so far has expired.
async fn leases_expire() {
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A fleet member: its own redb file, the shared bucket under `prefix`.
struct Member {
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

fn member(weed: &Weed, prefix: &str, durability: &str) -> Member {
    member_with(weed, prefix, durability, &[])
}

fn member_with(weed: &Weed, prefix: &str, durability: &str, extra: &[&str]) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let url = weed.url(prefix);
    let mut args = ARGS.to_vec();
    args.extend(["--remote", &url, "--remote-durability", durability]);
    args.extend(extra);
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

/// A two-turn conversation run through on `d` for reference, then the first turn of another
/// with the same seed: its id, the second turn's prompt, and the tokens the second turn must
/// give wherever it runs.
async fn reference_and_first_turn(d: &Daemon, seed: u64) -> (String, String, Vec<i64>) {
    let first = prompt();
    let reference = Uuid::new_v4().to_string();
    let (_, text) = turn(d, &reference, &first, Some(seed)).await;
    let second = format!("{first}{text} And then?");
    let (expected, _) = turn(d, &reference, &second, None).await;
    let session = Uuid::new_v4().to_string();
    let (_, same_text) = turn(d, &session, &first, Some(seed)).await;
    assert_eq!(same_text, text, "the same seed gives the same first turn");
    (session, second, expected)
}

/// The status `d` answers `method path` with.
async fn status(d: &Daemon, method: reqwest::Method, path: &str) -> u16 {
    let response = d.client.request(method, d.url(path)).send().await.unwrap();
    response.status().as_u16()
}

/// The conversation object the bucket holds for `session` under `prefix`, if any.
async fn in_bucket(
    weed: &Weed,
    prefix: &str,
    session: &str,
) -> Option<kvsnap::store::remote::Versioned> {
    weed.remote(prefix)
        .conversation(session.parse().unwrap())
        .await
        .unwrap()
}

async fn health(d: &Daemon) -> Value {
    d.get_json("/health").await
}

#[tokio::test]
async fn a_conversation_continues_exactly_on_another_instance_after_a_kill_9() {
    let weed = Weed::start("kvsnap-fleet").await;
    let a = member(&weed, "one", "remote-sync");
    // The same conversation, interrupted: A dies right after the first turn's reply.
    let (session, second, expected) = reference_and_first_turn(&a.daemon, 7).await;
    let a_base = a.daemon.base.clone();
    a.daemon.kill_9();
    leases_expire().await;

    let b = member(&weed, "one", "remote-sync");
    let (continued, _) = turn(&b.daemon, &session, &second, None).await;
    assert_eq!(
        continued, expected,
        "B continues the conversation A saved, token for token and with its random stream"
    );
    assert_eq!(b.daemon.metric("kvsnap_remote_fetches_total").await, 1.0);
    assert_eq!(health(&b.daemon).await["status"], "ok");
    // B took A's expired lease: its audit trail says so, and whose it was.
    let trail = b.daemon.get_json("/admin/v1/audit").await;
    let taken: Vec<&Value> = trail["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{trail}"))
        .iter()
        .filter(|e| e["action"] == "lease_takeover" && e["target"] == session.as_str())
        .collect();
    assert_eq!(taken.len(), 1, "{trail:#}");
    assert!(taken[0]["actor"].as_str().unwrap().starts_with("instance:"));
    assert!(
        taken[0]["detail"].as_str().unwrap().contains(&a_base),
        "{trail:#}"
    );
    // B saved its turn back: a third instance finds B's version.
    let info_b = b.daemon.get_json(&format!("/v1/sessions/{session}")).await;
    drop(b);
    leases_expire().await;
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
    leases_expire().await;
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
async fn one_live_owner_others_redirect_and_an_older_copy_gives_way_to_the_newer() {
    let weed = Weed::start("kvsnap-lease").await;
    let a = member(&weed, "three", "remote-sync");
    // Started before A's turn: a start can take longer than a 2 s lease on a loaded machine.
    let b = member(&weed, "three", "remote-sync");
    let session = Uuid::new_v4().to_string();
    let first = prompt();
    let (_, text) = turn(&a.daemon, &session, &first, Some(5)).await;
    let path = format!("/v1/sessions/{session}");

    // While A's lease is live, B sends requests for the conversation to A.
    let answer = no_redirects()
        .get(b.daemon.url(&path))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 307);
    assert_eq!(
        answer.headers()["location"].to_str().unwrap(),
        a.daemon.url(&path),
        "redirected to the owner, same path"
    );
    // So is an upload of it, before its body is read: stored on B, it would be a copy the
    // bucket never takes (B's write loses to A's lease) and B's next claim drops.
    let snapshot = format!("{path}/snapshot");
    let file = a
        .daemon
        .client
        .get(a.daemon.url(&snapshot))
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    let file = file.bytes().await.unwrap();
    // Its first 16 KiB: B answers before it reads any (a cut file read would be a 4xx, not a
    // redirect), and closes the connection; a body larger than the socket's buffers could
    // still be on its way then, and the client would see a broken pipe instead of the answer.
    let answer = no_redirects()
        .put(b.daemon.url(&snapshot))
        .body(file[..16 * 1024].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 307, "an upload goes to the owner too");

    // A goes quiet; B takes the conversation over and further.
    leases_expire().await;
    let longer = format!("{first}{text} Later, on B.");
    turn(&b.daemon, &session, &longer, None).await;
    let on_b = b.daemon.get_json(&path).await;
    let answer = no_redirects()
        .get(a.daemon.url(&path))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 307, "now A sends it to B");
    assert_eq!(
        answer.headers()["location"].to_str().unwrap(),
        b.daemon.url(&path)
    );

    // B goes quiet; A, still holding its older copy, takes the conversation back: it gives
    // up its copy for B's newer one instead of overwriting it.
    leases_expire().await;
    let on_a = a.daemon.get_json(&path).await;
    assert_eq!(on_a["checksum"], on_b["checksum"], "{on_a}");
    assert_eq!(on_a["tokens"], on_b["tokens"]);
    let stored = in_bucket(&weed, "three", &session)
        .await
        .expect("in the bucket");
    assert_eq!(
        Value::from(stored.conversation.record.checksum),
        on_b["checksum"],
        "the bucket keeps B's conversation"
    );
    assert_eq!(
        stored.conversation.lease.expect("a lease").epoch,
        3,
        "owned by A, then B, then A"
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
    // Another conversation, in the bucket before the outage and deleted during it.
    let doomed = Uuid::new_v4().to_string();
    turn(&a.daemon, &doomed, "A short one.", Some(1)).await;

    weed.stop();
    let doomed_path = format!("/v1/sessions/{doomed}");
    let deleted = status(&a.daemon, reqwest::Method::DELETE, &doomed_path).await;
    assert_eq!(deleted, 200);
    let during = status(&a.daemon, reqwest::Method::GET, &doomed_path).await;
    assert_eq!(during, 404, "deleted here, whatever the bucket says");
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
    assert_eq!(healthy["remote"]["pending_uploads"], 0, "{healthy}");
    // The deletion reached the bucket, and nothing fetched the conversation back meanwhile.
    assert_eq!(
        status(&a.daemon, reqwest::Method::GET, &doomed_path).await,
        404
    );
    let in_bucket = in_bucket(&weed, "four", &doomed).await;
    assert!(
        in_bucket.is_none(),
        "the bucket still holds the deleted conversation"
    );
    let on_a = a
        .daemon
        .get_ok_json(&format!("/v1/sessions/{session}"))
        .await;
    a.daemon.kill_9();
    leases_expire().await;

    // Every acknowledged turn reached the bucket: another instance has exactly A's last one.
    let b = member(&weed, "four", "async");
    let on_b = b
        .daemon
        .get_ok_json(&format!("/v1/sessions/{session}"))
        .await;
    assert_eq!(on_b["tokens"], on_a["tokens"]);
    assert_eq!(on_b["checksum"], on_a["checksum"]);
}

#[tokio::test]
async fn a_move_within_the_fleet_hands_the_lease_over_and_sends_no_page() {
    const ADMIN: &str = "fleet-admin";
    let weed = Weed::start("kvsnap-handover").await;
    let mut b = member_with(&weed, "five", "async", &["--admin-api-key", ADMIN]);
    b.daemon.key = Some(ADMIN.into());
    let peer = format!("--peer={}={ADMIN}", b.daemon.base);
    let mut a = member_with(&weed, "five", "async", &["--admin-api-key", ADMIN, &peer]);
    a.daemon.key = Some(ADMIN.into());

    // Async mode: the turn is acknowledged before its upload; the handover uploads it first.
    let (session, second, expected) = reference_and_first_turn(&a.daemon, 9).await;
    let (status, report) = a
        .daemon
        .post(
            &format!("/admin/v1/sessions/{session}/migrate"),
            json!({"target": b.daemon.base}),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "handed_over", "{report}");
    assert_eq!(
        report["bytes"], 0,
        "nothing sent between the instances: {report}"
    );

    // The bucket's object names B, and B continues the conversation exactly.
    let stored = in_bucket(&weed, "five", &session)
        .await
        .expect("in the bucket");
    let lease = stored.conversation.lease.expect("a lease");
    assert_eq!(lease.url, b.daemon.base);
    assert_eq!(lease.epoch, 2, "A's, then handed to B");
    let (continued, _) = turn(&b.daemon, &session, &second, None).await;
    assert_eq!(continued, expected);
    assert_eq!(b.daemon.metric("kvsnap_remote_fetches_total").await, 1.0);

    // A sends requests for it to B, and has not deleted B's object.
    let path = format!("/v1/sessions/{session}");
    let answer = no_redirects()
        .get(a.daemon.url(&path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 307);
    assert_eq!(
        answer.headers()["location"].to_str().unwrap(),
        b.daemon.url(&path)
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let stored = in_bucket(&weed, "five", &session)
        .await
        .expect("still in the bucket");
    assert_eq!(
        stored.conversation.lease.expect("a lease").url,
        b.daemon.base
    );
}

/// `remote-sync` promises that an acknowledged turn is in the bucket. A turn that outlived
/// its lease, while another instance took the conversation over and continued it, used to be
/// acknowledged anyway (its conditional upload lost, and losing answered Ok). Now such a turn
/// ends in an error, and the bucket keeps the other instance's turn.
#[tokio::test]
async fn a_remote_sync_turn_another_instance_superseded_is_not_acknowledged() {
    let weed = Weed::start("kvsnap-superseded").await;
    let a = member(&weed, "six", "remote-sync");
    let b = member(&weed, "six", "remote-sync");
    let session = Uuid::new_v4().to_string();
    let text = prompt();
    turn(&a.daemon, &session, &text, Some(3)).await;

    // A long turn on A: its 2 s lease ends while it generates.
    let long = a.daemon.post(
        "/completion",
        json!({"prompt": format!("{text} Go on at length."), "session_id": session,
               "n_predict": 600, "ignore_eos": true, "temperature": 0.8}),
    );
    let takeover = async {
        leases_expire().await;
        // B takes the conversation over and continues it.
        turn(&b.daemon, &session, &format!("{text} Meanwhile"), None).await;
        in_bucket(&weed, "six", &session).await.unwrap()
    };
    let ((status, reply), on_b) = tokio::join!(long, takeover);
    assert_eq!(
        status, 503,
        "the superseded turn must not be acknowledged: {reply}"
    );
    let after = in_bucket(&weed, "six", &session).await.unwrap();
    assert_eq!(
        after.conversation.record.checksum, on_b.conversation.record.checksum,
        "the bucket keeps B's turn"
    );
}

/// A store restored from a backup has the same instance id as the one that wrote the bucket's
/// newer copy; it used to upload its older copy over it (its own lease said "mine"). Now the
/// copy with more saves wins: the restored instance continues from the bucket's.
#[tokio::test]
async fn a_store_restored_from_a_backup_continues_from_the_buckets_newer_copy() {
    let weed = Weed::start("kvsnap-backup").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let backup = dir.path().join("backup.redb");
    let url = weed.url("seven");
    let mut args = ARGS.to_vec();
    args.extend(["--remote", &url, "--remote-durability", "remote-sync"]);
    let start = || Daemon::start_with_env(dir.path(), &data, &args, &weed.env());

    let session = Uuid::new_v4().to_string();
    let mut text = prompt();
    let d = start();
    let (_, reply) = turn(&d, &session, &text, Some(5)).await;
    text.push_str(&reply);
    let older = d.get_ok_json(&format!("/v1/sessions/{session}")).await;
    d.stop();
    std::fs::copy(&data, &backup).unwrap();

    let d = start();
    text.push_str(" Then");
    let (_, reply) = turn(&d, &session, &text, None).await;
    text.push_str(&reply);
    d.stop();

    // The disk is restored from the backup: one turn behind the bucket.
    std::fs::copy(&backup, &data).unwrap();
    let d = start();
    text.push_str(" At last");
    let reply = d
        .ok(
            "/completion",
            json!({"prompt": text, "session_id": session, "n_predict": 8, "temperature": 0.8}),
        )
        .await;
    // The second turn added some 25 tokens to the first's history (its text tokenized again
    // may part from its tokens by a token or two at the joins).
    let reused = reply["timings"]["cache_n"].as_u64().unwrap();
    assert!(
        reused > older["tokens"].as_u64().unwrap() + 10,
        "the turn continued from the older copy: {reused} tokens reused, the older copy holds {}",
        older["tokens"]
    );
    let stored = in_bucket(&weed, "seven", &session).await.unwrap();
    assert_eq!(
        stored.conversation.record.saves, 3,
        "{:?}",
        stored.conversation.record
    );
}

/// A Responses API request: `input`, continuing `previous` when given; sampled, with a seed
/// on the first response only, so the second continues the first's own random stream.
fn response_request(previous: Option<&str>, input: &str) -> Value {
    let mut body = json!({"input": input, "max_output_tokens": 24, "temperature": 0.8});
    match previous {
        Some(id) => body["previous_response_id"] = json!(id),
        None => body["seed"] = json!(7),
    }
    body
}

fn output_text(response: &Value) -> &str {
    response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no output text: {response}"))
}

#[tokio::test]
async fn a_response_is_continued_on_another_member_after_a_kill_9() {
    for durability in ["remote-sync", "async"] {
        response_continued_elsewhere(durability).await;
    }
}

/// A answers a response and dies; B continues it from the bucket, exactly as one daemon
/// alone continues it. With `async`, A's uploads are waited for before it dies.
async fn response_continued_elsewhere(durability: &str) {
    let first_input = format!("Tell me more. {}", common::long_prose(200).trim_end());
    // The reference: one daemon answers both, the second continuing the first.
    let alone = Daemon::start(&ARGS);
    let first = alone
        .ok("/v1/responses", response_request(None, &first_input))
        .await;
    let first_id = first["id"].as_str().expect("id").to_string();
    let second = alone
        .ok(
            "/v1/responses",
            response_request(Some(&first_id), "And then?"),
        )
        .await;
    drop(alone);

    let weed = Weed::start("responses").await;
    let a = member(&weed, "fleet", durability);
    let b = member(&weed, "fleet", durability);
    let answered = a
        .daemon
        .ok("/v1/responses", response_request(None, &first_input))
        .await;
    assert_eq!(output_text(&answered), output_text(&first));
    let answered_id = answered["id"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while health(&a.daemon).await["remote"]["pending_uploads"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "uploads still pending"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A dies the moment it answered: the response and its state are in the bucket.
    let Member { daemon, _dir } = a;
    daemon.kill_9();
    leases_expire().await;

    let continued = b
        .daemon
        .ok(
            "/v1/responses",
            response_request(Some(&answered_id), "And then?"),
        )
        .await;
    assert_eq!(output_text(&continued), output_text(&second), "{continued}");
    // Read from the first response's state in the bucket, not again.
    assert_eq!(continued["usage"], second["usage"], "{continued}");
    let read_back = b
        .daemon
        .get_ok_json(&format!("/v1/responses/{answered_id}"))
        .await;
    assert_eq!(output_text(&read_back), output_text(&first));
    drop(weed);
}
