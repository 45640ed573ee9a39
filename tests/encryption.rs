//! Encryption at rest on the real model, a real redb file and a real SeaweedFS bucket: what a
//! conversation says is nowhere in the store or the bucket in the clear, it still continues
//! exactly, keys rotate while the daemon serves, and sealed exports open only where the key is.
//! The daemons here run one at a time.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::Daemon;
use common::weed::Weed;
use kvsnap::snapshot::manifest::{Manifest, PageBytes};
use serde_json::{Value, json};
use uuid::Uuid;

const ADMIN: &str = "admin-key";
/// Without API keys, so conversations have no owner and their pages the salt `cut_file`
/// gives them with `None`.
const FLAGS: [&str; 4] = ["-c", "2048", "-np", "2"];

fn secret_prompt() -> String {
    format!(
        "Confidential: the vault code of Marisol Quintanilla-Oyelaran is 7741-KESTREL. {}",
        common::long_prose(200).trim_end()
    )
}

fn new_key_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("keys.toml");
    let (ok, out, err) = common::cli(&["keys", "new", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("--encryption-key-file"), "{out}");
    path
}

/// One seeded, sampled turn: the generated token ids.
async fn turn(d: &Daemon, session: &str, prompt: &str) -> Vec<i64> {
    let reply = d
        .ok(
            "/completion",
            json!({"prompt": prompt, "session_id": session, "n_predict": 12,
                   "temperature": 0.8, "seed": 7, "return_tokens": true}),
        )
        .await;
    reply["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

/// What must never be found in the clear: byte strings a store or bucket holding the
/// conversation in the clear contains, with a label for the failure message.
fn needles(prompt: &str, snapshot: &[u8]) -> Vec<(String, Vec<u8>)> {
    let parsed = kvsnap::snapshot::Snapshot::decode(snapshot).unwrap();
    let tokens = &parsed.tokens[20..32];
    let mut out = vec![
        (
            "the prompt's text".to_string(),
            prompt.as_bytes()[..40].to_vec(),
        ),
        (
            "12 token ids as i32".into(),
            tokens.iter().flat_map(|t| t.to_le_bytes()).collect(),
        ),
        (
            // How a manifest stores them: MessagePack, after the array's one-byte header.
            "12 token ids as MessagePack".into(),
            rmp_serde::to_vec(tokens).unwrap()[1..].to_vec(),
        ),
    ];
    let (_, pages): (Manifest, PageBytes) = Manifest::cut_file(snapshot, None).unwrap();
    assert!(!pages.is_empty());
    for (n, (id, bytes)) in pages.iter().enumerate() {
        out.push((format!("page {n}'s content id"), id.to_vec()));
        out.push((
            format!("page {n}'s content id in hex"),
            hex::encode(id).into_bytes(),
        ));
        let middle = bytes.len() / 2;
        out.push((
            format!("64 bytes of page {n}"),
            bytes[middle..middle + 64].to_vec(),
        ));
    }
    out
}

fn found_in(haystack: &[u8], needles: &[(String, Vec<u8>)]) -> Vec<String> {
    needles
        .iter()
        .filter(|(_, needle)| {
            haystack
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
        })
        .map(|(label, _)| label.clone())
        .collect()
}

/// Every object under `prefix`: its name and bytes, as one buffer.
async fn bucket_bytes(weed: &Weed, prefix: &str) -> (usize, Vec<u8>) {
    let objects = weed.read_objects(prefix).await;
    let mut all = Vec::new();
    for (location, bytes) in &objects {
        all.extend_from_slice(location.as_ref().as_bytes());
        all.extend_from_slice(bytes);
    }
    (objects.len(), all)
}

/// Until an unnamed entry reached the bucket and nothing else waits to.
async fn entry_uploaded(d: &Daemon) {
    for _ in 0..300 {
        let health = d.get_json("/health").await;
        if d.metric("kvsnap_remote_entries_uploaded_total").await >= 1.0
            && health["remote"]["pending_uploads"] == 0
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no unnamed entry reached the bucket");
}

async fn send(d: &Daemon, method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let answer = d
        .client
        .request(method, d.url(path))
        .bearer_auth(ADMIN)
        .body(body)
        .send()
        .await
        .unwrap();
    (
        answer.status().as_u16(),
        answer.bytes().await.unwrap().to_vec(),
    )
}

#[tokio::test]
async fn nothing_said_is_in_the_file_or_the_bucket_in_the_clear_and_it_continues_exactly() {
    let weed = Weed::start("kvsnap-sealed").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = new_key_file(dir.path());
    let sealed_data = dir.path().join("sealed.redb");
    let remote = weed.url("sealed");
    let mut flags = FLAGS.to_vec();
    let key_flag = keys.to_str().unwrap();
    flags.extend([
        "--encryption-key-file",
        key_flag,
        "--remote",
        &remote,
        "--remote-durability",
        "remote-sync",
    ]);
    let prompt = secret_prompt();
    let session = Uuid::new_v4().to_string();
    let sealed = Daemon::start_with_env(dir.path(), &sealed_data, &flags, &weed.env());
    turn(&sealed, &session, &prompt).await;
    // The same prompt once more, naming no conversation: kept as an unnamed entry, which goes
    // to the bucket too.
    sealed
        .ok("/completion", json!({"prompt": prompt, "n_predict": 4}))
        .await;
    entry_uploaded(&sealed).await;
    let snapshot = sealed
        .client
        .get(sealed.url(&format!("/v1/sessions/{session}/snapshot")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let (status, export) = send(
        &sealed,
        reqwest::Method::GET,
        &format!("/v1/sessions/{session}/export?sealed=true"),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(export.starts_with(b"KVSNAPE\x02"));
    let file = dir.path().join("sealed.kvsnap");
    let (ok, out, err) = common::cli(&[
        "export",
        &session,
        "-o",
        file.to_str().unwrap(),
        "--sealed",
        "--server",
        &sealed.url(""),
    ]);
    assert!(ok && out.contains("sealed"), "{out}{err}");
    let (ok, out, err) = common::cli(&["inspect", file.to_str().unwrap()]);
    assert!(
        ok && out.contains("sealed kvsnap snapshot") && out.contains("\"k1\""),
        "{out}{err}"
    );
    sealed.stop();

    let needles = needles(&prompt, &snapshot);
    let in_snapshot = found_in(&snapshot, &needles[..3]);
    assert!(
        in_snapshot.iter().any(|n| n.contains("MessagePack")),
        "the detector finds the tokens in the plain snapshot file: {in_snapshot:?}"
    );
    let leaked = found_in(&std::fs::read(&sealed_data).unwrap(), &needles);
    assert!(
        leaked.is_empty(),
        "the redb file holds in the clear: {leaked:?}"
    );
    let (objects, bucket) = bucket_bytes(&weed, "sealed").await;
    assert!(
        objects >= 3,
        "the conversation, the entry and their pages are in the bucket"
    );
    let names = weed.read_objects("sealed").await;
    assert!(
        names
            .iter()
            .any(|(location, _)| location.as_ref().contains("/entries/")),
        "an unnamed entry is in the bucket"
    );
    let leaked = found_in(&bucket, &needles);
    assert!(
        leaked.is_empty(),
        "the bucket holds in the clear: {leaked:?}"
    );
    assert!(found_in(&export, &needles).is_empty(), "the sealed export");

    // The control: the same conversation on a daemon without keys is found by every needle
    // kind, so the checks above can see what they look for.
    let plain_data = dir.path().join("plain.redb");
    let plain = Daemon::start_on(dir.path(), &plain_data, &FLAGS);
    turn(&plain, &session, &prompt).await;
    let (status, refused) = send(
        &plain,
        reqwest::Method::PUT,
        &format!("/v1/sessions/{}/snapshot", Uuid::new_v4()),
        export.clone(),
    )
    .await;
    assert_eq!(status, 400, "a sealed file where no key is");
    assert!(String::from_utf8_lossy(&refused).contains("no key file"));
    let follow_up = format!("{prompt} And the second part?");
    let expected = turn(&plain, &session, &follow_up).await;
    plain.stop();
    let plain_found = found_in(&std::fs::read(&plain_data).unwrap(), &needles);
    for kind in ["MessagePack", "content id", "64 bytes of page"] {
        assert!(
            plain_found.iter().any(|label| label.contains(kind)),
            "a plain store holds {kind}: {plain_found:?}"
        );
    }

    // Restarted on its sealed file, the encrypted conversation continues token for token as
    // the plain one did; the sealed export imports there as a new conversation.
    let sealed = Daemon::start_with_env(dir.path(), &sealed_data, &flags, &weed.env());
    assert_eq!(turn(&sealed, &session, &follow_up).await, expected);
    let copy = Uuid::new_v4();
    let (status, body) = send(
        &sealed,
        reqwest::Method::PUT,
        &format!("/v1/sessions/{copy}/snapshot"),
        export,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    sealed.stop();

    // Without its key file the store is refused with a sentence, not read as garbage.
    let refused = Daemon::try_start_on(dir.path(), &sealed_data, &FLAGS).err();
    let log = refused.expect("a sealed store needs its key file");
    assert!(log.contains("--encryption-key-file"), "{log}");
}

#[tokio::test]
async fn keys_rotate_while_serving_and_the_old_key_can_then_go() {
    let weed = Weed::start("kvsnap-rekey").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = new_key_file(dir.path());

    // A key file others may read is refused before anything starts.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = Daemon::try_start(&["--encryption-key-file", keys.to_str().unwrap()])
        .err()
        .expect("refused");
    assert!(log.contains("chmod 600"), "{log}");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();

    let data = dir.path().join("kvsnap.redb");
    let remote = weed.url("rekey");
    let mut flags = FLAGS.to_vec();
    flags.extend(["--admin-api-key", ADMIN]);
    flags.extend([
        "--encryption-key-file",
        keys.to_str().unwrap(),
        "--remote",
        &remote,
        "--remote-durability",
        "remote-sync",
    ]);
    let mut d = Daemon::start_with_env(dir.path(), &data, &flags, &weed.env());
    d.key = Some(ADMIN.into());
    let prompt = secret_prompt();
    let sessions: Vec<String> = (0..3).map(|_| Uuid::new_v4().to_string()).collect();
    for session in &sessions {
        turn(&d, session, &prompt).await;
    }
    // An unnamed entry in the bucket, to be sealed again with the rest.
    d.ok("/completion", json!({"prompt": prompt, "n_predict": 4}))
        .await;
    entry_uploaded(&d).await;

    let (ok, out, err) = common::cli(&["keys", "rotate", keys.to_str().unwrap()]);
    assert!(ok && out.contains("added key k2"), "{out}{err}");
    let (ok, out, err) = common::cli(&["rekey", "--server", &d.url(""), "--key", ADMIN]);
    assert!(ok, "{err}");
    assert!(out.contains("sealed with key k2"), "{out}");
    let status: Value = d.get_json("/admin/v1/rekey").await;
    assert_eq!(status["state"], "done");
    assert!(
        status["store"]["found"].as_u64().unwrap() >= 3 * 3,
        "{status}"
    );
    assert_eq!(status["store"]["done"], status["store"]["found"]);
    assert!(status["bucket"]["done"].as_u64().unwrap() >= 3, "{status}");
    let audit: Value = d.get_json("/admin/v1/audit").await;
    let rekeys = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rekey" && e["outcome"] == "ok")
        .count();
    assert_eq!(rekeys, 1, "{audit}");

    // Every bucket object is sealed with k2 now.
    for (location, bytes) in weed.read_objects("rekey").await {
        assert_eq!(
            kvsnap::keys::sealed_key_id(&bytes),
            Some("k2"),
            "{location}"
        );
    }

    // A fork made now continues as its source will: the reference for after the restart.
    let follow_up = format!("{prompt} Go on.");
    let fork = d
        .ok(&format!("/v1/sessions/{}/fork", sessions[0]), json!({}))
        .await;
    let fork = fork["session_id"].as_str().unwrap().to_string();
    let expected = turn(&d, &fork, &follow_up).await;
    d.stop();

    // k1 removed from the file: after a restart everything still reads and continues exactly.
    let mut file = kvsnap::keys::KeyFile::read(&keys).unwrap();
    file.keys.remove("k1");
    file.write(&keys, true).unwrap();
    let mut d = Daemon::start_with_env(dir.path(), &data, &flags, &weed.env());
    d.key = Some(ADMIN.into());
    let listed = d.get_json("/v1/sessions").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 4, "{listed}");
    assert_eq!(turn(&d, &sessions[0], &follow_up).await, expected);
    for session in &sessions[1..] {
        turn(&d, session, &follow_up).await;
    }
}
