//! Moving conversations between two real daemons on loopback, each with its own store:
//! exact continuation on the target, forwarding at the source, a target dying mid-transfer
//! (the retry resumes without sending again the pages it had taken),
//! refusal of another model, and a bulk move while the source keeps serving.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, cli, long_prose, renamed_model_copy};
use serde_json::{Value, json};
use uuid::Uuid;

const USER: &str = "user-key";
const OTHER_USER: &str = "other-user-key";
const ADMIN_A: &str = "admin-a";
const ADMIN_B: &str = "admin-b";

/// Flags every daemon here shares: the same user keys, and `admin` as its admin key.
fn daemon_args<'a>(admin: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-c",
        "8192",
        "-np",
        "2",
        "--api-key",
        USER,
        "--api-key",
        OTHER_USER,
        "--admin-api-key",
        admin,
    ];
    args.extend(extra);
    args
}

fn target_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    daemon_args(ADMIN_B, extra)
}

/// The source: its own admin key, `targets` as peers.
fn start_source(targets: &[&Daemon], extra: &[&str]) -> Daemon {
    let peers: Vec<String> = targets
        .iter()
        .map(|t| format!("--peer={}={ADMIN_B}", t.base))
        .collect();
    let mut flags: Vec<&str> = peers.iter().map(String::as_str).collect();
    flags.extend(extra);
    Daemon::start(&daemon_args(ADMIN_A, &flags))
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = client.request(method, url).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("request")
}

/// GET `path` on `d` with `key`.
async fn get(d: &Daemon, path: &str, key: &str) -> reqwest::Response {
    send(&d.client, reqwest::Method::GET, &d.url(path), key, None).await
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A turn of conversation `session`; turn 1 samples with a seed, turn 2 continues the
/// conversation's own random stream.
fn turn(history: &str, session: &str, seed: Option<u64>) -> Value {
    let mut body = json!({
        "prompt": history,
        "session_id": session,
        "n_predict": 12,
        "temperature": 0.9,
        "return_tokens": true,
    });
    if let Some(seed) = seed {
        body["seed"] = json!(seed);
    }
    body
}

async fn completion(d: &Daemon, body: Value) -> Value {
    let (status, reply) = json_of(
        send(
            &d.client,
            reqwest::Method::POST,
            &d.url("/completion"),
            USER,
            Some(body),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    reply
}

async fn migrate(source: &Daemon, session: &str, target: &str) -> (u16, Value) {
    json_of(
        send(
            &source.client,
            reqwest::Method::POST,
            &source.url(&format!("/admin/v1/sessions/{session}/migrate")),
            ADMIN_A,
            Some(json!({ "target": target })),
        )
        .await,
    )
    .await
}

/// Pages of conversations in transfer `d` has taken (and kept), from its request counts.
async fn pages_received(d: &Daemon) -> u64 {
    let metrics = d
        .client
        .get(d.url("/metrics"))
        .bearer_auth(USER)
        .send()
        .await;
    let Ok(metrics) = metrics else { return 0 };
    let text = metrics.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("kvsnap_http_requests_total"))
        .filter(|l| l.contains("/incoming/pages/") && l.contains("status=\"204\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|n| n as u64)
        .sum()
}

#[tokio::test]
async fn a_moved_conversation_continues_exactly_and_survives_a_target_dying_mid_transfer() {
    let workdir = tempfile::tempdir().unwrap();
    let b_data = workdir.path().join("b.redb");
    let b = Daemon::start_on(workdir.path(), &b_data, &target_args(&[]));
    // 1 MiB/s: the ~10 MB snapshot takes seconds to send, time enough to kill the target.
    let a = start_source(&[&b], &["--migrate-rate-limit", "1"]);
    // Longer than the 512-token sliding window.
    let history = long_prose(520);

    // The uninterrupted conversation.
    let reference = Uuid::new_v4().to_string();
    let ref1 = completion(&a, turn(&history, &reference, Some(7))).await;
    let second_prompt = format!("{history}{} And then", ref1["content"].as_str().unwrap());
    let ref2 = completion(&a, turn(&second_prompt, &reference, None)).await;

    let session = Uuid::new_v4().to_string();
    let first = completion(&a, turn(&history, &session, Some(7))).await;
    assert_eq!(first["tokens"], ref1["tokens"]);

    // First attempt: the target dies while the snapshot is on its way.
    let moving = {
        let (client, url) = (
            a.client.clone(),
            a.url(&format!("/admin/v1/sessions/{session}/migrate")),
        );
        let target = b.base.clone();
        tokio::spawn(async move {
            json_of(
                send(
                    &client,
                    reqwest::Method::POST,
                    &url,
                    ADMIN_A,
                    Some(json!({"target": target})),
                )
                .await,
            )
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = get(&a, &format!("/v1/sessions/{session}"), USER).await;
        if response.status() == 409 {
            break;
        }
        assert!(Instant::now() < deadline, "the move never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Halfway: the target has taken some of its pages.
    let arrived = loop {
        let arrived = pages_received(&b).await;
        if arrived >= 3 {
            break arrived;
        }
        assert!(Instant::now() < deadline, "no page arrived at the target");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A turn for a moving conversation is refused with a retry hint, never forked.
    let during = send(
        &a.client,
        reqwest::Method::POST,
        &a.url("/completion"),
        USER,
        Some(turn(&second_prompt, &session, None)),
    )
    .await;
    assert_eq!(during.status(), 409);
    assert!(during.headers().contains_key("retry-after"));
    let b_port = b.port();
    b.kill_9();
    let (status, failed) = moving.await.unwrap();
    assert_eq!(status, 502, "{failed}");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stays here"),
        "{failed}"
    );
    // The source still has it, whole, and serves it again.
    let (status, info) = json_of(get(&a, &format!("/v1/sessions/{session}"), USER).await).await;
    assert_eq!(status, 200, "{info}");

    // Retry against the restarted target: it completes, and a second retry is a no-op.
    let b = Daemon::start_on(workdir.path(), &b_data, &target_args(&["--port", &b_port]));
    let (status, report) = migrate(&a, &session, &b.base).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "moved");
    // It resumed: every page the target had taken before it died was kept and not sent again.
    let resumed = report["pages_resumed"].as_u64().unwrap();
    assert!(resumed >= arrived, "{arrived} pages had arrived: {report}");
    assert!(report["pages_sent"].as_u64().unwrap() >= 1, "{report}");
    let snapshot_bytes = info["bytes"].as_u64().unwrap();
    assert!(
        report["bytes"].as_u64().unwrap() < snapshot_bytes,
        "the retry sent no less than the whole snapshot ({snapshot_bytes} bytes): {report}"
    );
    let (status, again) = migrate(&a, &session, &b.base).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["outcome"], "already_moved");

    // The source forwards: the same request, redirected to the same path on the target.
    let plain = no_redirects();
    let forwarded = send(
        &plain,
        reqwest::Method::POST,
        &a.url("/completion"),
        USER,
        Some(turn(&second_prompt, &session, None)),
    )
    .await;
    assert_eq!(forwarded.status(), 307);
    let location = forwarded.headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(location, b.url("/completion"));
    let described = send(
        &plain,
        reqwest::Method::GET,
        &a.url(&format!("/v1/sessions/{session}")),
        USER,
        None,
    )
    .await;
    assert_eq!(described.status(), 307);
    assert_eq!(
        described.headers()["location"].to_str().unwrap(),
        b.url(&format!("/v1/sessions/{session}"))
    );

    // On the target it continues exactly as the uninterrupted conversation, from its history.
    let second = json_of(
        send(
            &b.client,
            reqwest::Method::POST,
            &location,
            USER,
            Some(turn(&second_prompt, &session, None)),
        )
        .await,
    )
    .await
    .1;
    assert_eq!(second["tokens"], ref2["tokens"]);
    let evaluated = first["tokens_evaluated"].as_u64().unwrap();
    assert!(
        second["timings"]["cache_n"].as_u64().unwrap() >= evaluated,
        "{second}"
    );
    // Its owner travelled with it.
    let stranger = get(&b, &format!("/v1/sessions/{session}"), OTHER_USER).await;
    assert_eq!(stranger.status(), 404);
    // A user upload at the source cannot revive the moved conversation there (a fork).
    let revived = no_redirects()
        .put(a.url(&format!("/v1/sessions/{session}/snapshot")))
        .bearer_auth(USER)
        .body(b"any bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(revived.status(), 307);

    // The audit trails. The source: who asked (the admin key's hash), and each attempt's
    // outcome, the failed one and the move, with where it went.
    let (_, trail) = json_of(get(&a, "/admin/v1/audit?limit=1000", ADMIN_A).await).await;
    let entries = trail["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{trail}"));
    let about = |action: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| e["action"] == action && e["target"] == session.as_str())
            .collect()
    };
    let admin_a = format!("key:{}", blake3::hash(ADMIN_A.as_bytes()).to_hex());
    assert!(
        about("migrate")
            .iter()
            .all(|e| e["actor"] == admin_a.as_str()),
        "{trail:#}"
    );
    let moves = about("move");
    assert!(moves.len() >= 2, "{trail:#}");
    assert!(
        moves[0]["outcome"].as_str().unwrap().starts_with("failed"),
        "{trail:#}"
    );
    let moved = moves
        .iter()
        .find(|e| e["outcome"] == "ok: moved")
        .unwrap_or_else(|| panic!("{trail:#}"));
    assert!(
        moved["detail"].as_str().unwrap().contains(&b.base),
        "{trail:#}"
    );
    // The target: the import, made with the admin key the source presents.
    let (_, trail) = json_of(get(&b, "/admin/v1/audit?limit=1000", ADMIN_B).await).await;
    let admin_b = format!("key:{}", blake3::hash(ADMIN_B.as_bytes()).to_hex());
    assert!(
        trail["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "import"
                && e["target"] == session.as_str()
                && e["outcome"] == "ok"
                && e["actor"] == admin_b.as_str()),
        "{trail:#}"
    );
}

#[tokio::test]
async fn a_target_with_another_model_is_refused_before_any_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let other = Daemon::start_with_model(&renamed_model_copy(dir.path()), &target_args(&[]));
    let fa_on = Daemon::start(&target_args(&["-fa", "on"]));
    let a = start_source(&[&other, &fa_on], &[]);
    let session = Uuid::new_v4().to_string();
    completion(
        &a,
        turn(
            "The lighthouse keeper counted the ships.",
            &session,
            Some(1),
        ),
    )
    .await;

    let (status, refused) = migrate(&a, &session, &other.base).await;
    assert_eq!(status, 409, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("another model"), "{message}");
    // Nothing to retry: a refusal carries no Retry-After.
    let refused_again = send(
        &a.client,
        reqwest::Method::POST,
        &a.url(&format!("/admin/v1/sessions/{session}/migrate")),
        ADMIN_A,
        Some(json!({"target": other.base})),
    )
    .await;
    assert!(!refused_again.headers().contains_key("retry-after"));
    // The same model with another layout is refused too, naming the difference.
    let (status, refused) = migrate(&a, &session, &fa_on.base).await;
    assert_eq!(status, 409, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("flash attention"), "{message}");
    // Nothing moved: the source keeps it, the target has nothing.
    let kept = get(&a, &format!("/v1/sessions/{session}"), USER).await;
    assert_eq!(kept.status(), 200);
    let listed = json_of(get(&other, "/v1/sessions", ADMIN_B).await).await.1;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");

    // The dry run says the same, per conversation.
    let (ok, stdout, stderr) = cli(&[
        "migrate",
        "--from",
        &a.base,
        "--to",
        &other.base,
        "--all",
        "--dry-run",
        "--key",
        ADMIN_A,
    ]);
    assert!(!ok, "a refused dry run exits non-zero: {stdout}{stderr}");
    assert!(
        stdout.contains(&format!("refuse  {session}")) && stdout.contains("another model"),
        "{stdout}"
    );

    // Only admin keys may move conversations, and only to configured peers.
    let user = send(
        &a.client,
        reqwest::Method::POST,
        &a.url(&format!("/admin/v1/sessions/{session}/migrate")),
        USER,
        Some(json!({"target": other.base})),
    )
    .await;
    assert_eq!(user.status(), 403);
    let (status, unknown) = migrate(&a, &session, "http://127.0.0.1:9").await;
    assert_eq!(status, 400);
    assert!(
        unknown["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a configured peer")
    );
    // The target's import needs its admin key too.
    let import = send(
        &other.client,
        reqwest::Method::PUT,
        &other.url(&format!("/admin/v1/sessions/{session}/import")),
        USER,
        None,
    )
    .await;
    assert_eq!(import.status(), 403);
    // The target checks what arrives against its checksum header.
    let import_url = other.url(&format!("/admin/v1/sessions/{session}/import"));
    let damaged = other
        .client
        .put(&import_url)
        .bearer_auth(ADMIN_B)
        .header("x-kvsnap-checksum", "00".repeat(32))
        .body(b"some bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(damaged.status(), 422);
    let unlabelled = other
        .client
        .put(&import_url)
        .bearer_auth(ADMIN_B)
        .body(b"some bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(unlabelled.status(), 400);
    // Migration routes are never open: without an admin key configured they answer 403.
    drop(fa_on);
    let open = Daemon::start(&["-c", "2048", "-np", "1"]);
    for (method, path) in [
        (reqwest::Method::GET, "/admin/v1/identity"),
        (reqwest::Method::POST, "/admin/v1/migrate"),
    ] {
        let response = open
            .client
            .request(method, open.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{path}");
    }
}

/// `count` short conversations on `a` (the prompt of each from `prompt`), then one bulk move of
/// them all to `b`, accepted (202): their ids and the job's answer.
async fn conversations_moved_in_bulk(
    a: &Daemon,
    b: &Daemon,
    count: u64,
    prompt: impl Fn(u64) -> String,
) -> (Vec<String>, Value) {
    let mut ids = Vec::new();
    for i in 0..count {
        let id = Uuid::new_v4().to_string();
        let mut body = turn(&prompt(i), &id, Some(i));
        body["n_predict"] = json!(2);
        completion(a, body).await;
        ids.push(id);
    }
    let (status, job) = json_of(
        send(
            &a.client,
            reqwest::Method::POST,
            &a.url("/admin/v1/migrate"),
            ADMIN_A,
            Some(json!({"target": b.base, "sessions": ids})),
        )
        .await,
    )
    .await;
    assert_eq!(status, 202, "{job}");
    (ids, job)
}

#[tokio::test]
async fn a_bulk_move_of_20_conversations_completes_while_the_source_keeps_serving() {
    let b = Daemon::start(&target_args(&[]));
    // Paced so the job is still running while the source serves another conversation.
    let a = start_source(
        &[&b],
        &["--migrate-rate-limit", "4", "--moved-sessions", "gone"],
    );
    let (ids, job) = conversations_moved_in_bulk(&a, &b, 20, |i| {
        format!("Conversation number {i} is about the harbour, the boats and the gulls.")
    })
    .await;
    let job_url = a.url(&format!(
        "/admin/v1/jobs/{}",
        job["job_id"].as_str().unwrap()
    ));

    // Meanwhile the source serves a conversation that stays.
    let stay = Uuid::new_v4().to_string();
    completion(
        &a,
        turn("A conversation that stays on the source.", &stay, Some(3)),
    )
    .await;
    let during = json_of(send(&a.client, reqwest::Method::GET, &job_url, ADMIN_A, None).await)
        .await
        .1;
    assert_eq!(
        during["state"], "running",
        "served while the job ran: {during}"
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let status = json_of(send(&a.client, reqwest::Method::GET, &job_url, ADMIN_A, None).await)
            .await
            .1;
        if status["state"] == "finished" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not finish: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["sessions_moved"], 20, "{done}");
    assert_eq!(done["failures"].as_array().unwrap().len(), 0, "{done}");
    assert!(done["bytes_done"].as_u64().unwrap() > 0);

    let on_b = json_of(get(&b, "/v1/sessions?limit=100", ADMIN_B).await)
        .await
        .1;
    assert_eq!(on_b["data"].as_array().unwrap().len(), 20, "{on_b}");
    let on_a = json_of(get(&a, "/v1/sessions?limit=100", ADMIN_A).await)
        .await
        .1;
    let left: Vec<&str> = on_a["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(left, vec![stay.as_str()]);
    // This source answers moved conversations with 410 naming where they went.
    let gone = get(&a, &format!("/v1/sessions/{}", ids[0]), USER).await;
    assert_eq!(gone.status(), 410);
    let (_, body) = json_of(gone).await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&b.base),
        "{body}"
    );
}

#[tokio::test]
async fn a_page_transfer_with_bad_parts_gets_a_4xx_with_a_sentence() {
    let b = Daemon::start(&target_args(&[]));
    let session = Uuid::new_v4();
    let put = |path: String, body: Vec<u8>, checksum: Option<&str>| {
        let mut request = b.client.put(b.url(&path)).bearer_auth(ADMIN_B).body(body);
        if let Some(checksum) = checksum {
            request = request.header("x-kvsnap-checksum", checksum);
        }
        request.send()
    };
    let sentence = |body: &Value| body["error"]["message"].as_str().unwrap_or("").to_string();
    let page = "ab".repeat(32);

    // A page or a commit before any offer: nothing is open.
    let (status, body) = json_of(
        put(
            format!("/admin/v1/sessions/{session}/incoming/pages/{page}"),
            vec![1; 64],
            None,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(sentence(&body).contains("offer it first"), "{body}");
    let (status, body) = json_of(
        b.client
            .post(b.url(&format!("/admin/v1/sessions/{session}/incoming/commit")))
            .bearer_auth(ADMIN_B)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // A page id that is not one.
    let (status, body) = json_of(
        put(
            format!("/admin/v1/sessions/{session}/incoming/pages/xyz"),
            vec![1; 64],
            None,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(sentence(&body).contains("64 hex digits"), "{body}");

    // An offer without its checksum, and one whose manifest is not a manifest.
    let offer = format!("/admin/v1/sessions/{session}/incoming");
    let (status, body) =
        json_of(put(offer.clone(), b"KVSNAPM".to_vec(), None).await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    let checksum = "0".repeat(64);
    let (status, body) = json_of(
        put(
            offer,
            b"not a manifest at all, long enough to be read".to_vec(),
            Some(&checksum),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(!sentence(&body).is_empty(), "{body}");

    // The daemon is still well.
    assert_eq!(b.get_json("/health").await["status"], "ok");
}

/// SIGTERM used to end a bulk move wherever it was, silently: the job lived in memory only and
/// nothing said it had not finished. Now the move in progress finishes, no other starts, the
/// log names the job and how far it got, and every conversation is on exactly one instance.
#[tokio::test]
async fn sigterm_during_a_bulk_move_finishes_the_move_in_progress_and_says_so() {
    let b = Daemon::start(&target_args(&[]));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let peer = format!("--peer={}={ADMIN_B}", b.base);
    // About 0.6 s a conversation: the job is in its first moves when the signal comes.
    let flags = daemon_args(ADMIN_A, &[&peer, "--migrate-rate-limit", "0.25"]);
    let mut a = Daemon::start_on(dir.path(), &data, &flags);
    let (ids, _job) = conversations_moved_in_bulk(&a, &b, 12, |i| {
        format!("Conversation {i} about the harbour.")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    std::process::Command::new("kill")
        .args(["-TERM", &a.pid().to_string()])
        .status()
        .unwrap();
    let exit = a.wait_exit(Duration::from_secs(60));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let log = a.stderr();
    assert!(
        log.contains("a migration job stopped at shutdown before its list was done"),
        "{}",
        common::last_lines(&log, 20)
    );

    let a = Daemon::start_on(dir.path(), &data, &flags);
    let mut on_both = 0;
    let mut on_neither = 0;
    let plain = no_redirects();
    for id in &ids {
        let path = format!("/v1/sessions/{id}");
        let here = send(&plain, reqwest::Method::GET, &a.url(&path), ADMIN_A, None).await;
        let there = send(&plain, reqwest::Method::GET, &b.url(&path), ADMIN_B, None).await;
        let (here, there) = (here.status() == 200, there.status() == 200);
        on_both += usize::from(here && there);
        on_neither += usize::from(!here && !there);
    }
    assert_eq!((on_both, on_neither), (0, 0));
}

/// A migration target answers which pages it lacks; a hostile one used to be sent any page of
/// the source's store it named, another owner's included. Now the source sends only pages of
/// the conversation being moved.
#[tokio::test]
async fn a_hostile_target_gets_no_page_of_another_conversation() {
    use kvsnap::store::{SessionStore, Store};
    use std::sync::{Arc, Mutex};
    // A real target, whose identity the hostile one repeats so the source accepts it.
    let b = Daemon::start(&target_args(&[]));
    let identity = json_of(get(&b, "/admin/v1/identity", ADMIN_B).await)
        .await
        .1;

    let asked_for: Arc<Mutex<String>> = Arc::default();
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile_url = format!("http://{}", listener.local_addr().unwrap());
    {
        use axum::routing::{get as route_get, post, put};
        let (asked, got) = (asked_for.clone(), received.clone());
        let app = axum::Router::new()
            .route(
                "/admin/v1/identity",
                route_get(move || {
                    let identity = identity.clone();
                    async move { axum::Json(identity) }
                }),
            )
            .route(
                "/admin/v1/sessions/{id}/incoming",
                put(move || {
                    let page = asked.lock().unwrap().clone();
                    async move { axum::Json(json!({"missing": [page], "staged": 0, "held": 0})) }
                }),
            )
            .route(
                "/admin/v1/sessions/{id}/incoming/pages/{page}",
                put(
                    move |axum::extract::Path((_, page)): axum::extract::Path<(String, String)>| {
                        got.lock().unwrap().push(page);
                        async { "ok" }
                    },
                ),
            )
            .route(
                "/admin/v1/sessions/{id}/incoming/commit",
                post(|| async { "ok" }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let peer = format!("--peer={hostile_url}=whatever");
    let flags = daemon_args(ADMIN_A, &[&peer]);
    let mut a = Daemon::start_on(dir.path(), &data, &flags);
    a.key = Some(OTHER_USER.into());
    let victim = Uuid::new_v4().to_string();
    a.ok(
        "/completion",
        json!({"prompt": "Another user's private words.", "n_predict": 2, "session_id": victim}),
    )
    .await;
    a.key = Some(USER.into());
    let moved = Uuid::new_v4().to_string();
    a.ok(
        "/completion",
        json!({"prompt": "A conversation that moves.", "n_predict": 2, "session_id": moved}),
    )
    .await;
    a.stop();
    let victim_page = {
        let store = Store::open(&data).unwrap();
        let manifest = store.manifest(victim.parse().unwrap()).unwrap().unwrap();
        let manifest = kvsnap::snapshot::manifest::Manifest::decode(&manifest).unwrap();
        hex::encode(manifest.page_ids()[0])
    };
    *asked_for.lock().unwrap() = victim_page.clone();

    let a = Daemon::start_on(dir.path(), &data, &flags);
    let (status, answer) = migrate(&a, &moved, &hostile_url).await;
    assert!(status >= 400, "{answer}");
    assert!(
        answer.to_string().contains("does not have"),
        "the refusal names the page asked for: {answer}"
    );
    assert!(
        !received.lock().unwrap().contains(&victim_page),
        "another conversation's page was sent to the target"
    );
}
