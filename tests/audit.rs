//! The audit trail: admin actions (and refused attempts at them) are entries in the store,
//! with the acting key's hash, the conversation and the outcome; users acting on their own
//! conversations are not; `GET /admin/v1/audit` and `kvsnap audit` read it, page by page, and
//! it survives a restart.

mod common;

use common::Daemon;
use serde_json::{Value, json};
use uuid::Uuid;

const USER: &str = "user-key";
const ADMIN: &str = "admin-key";

fn actor(key: &str) -> String {
    format!("key:{}", blake3::hash(key.as_bytes()).to_hex())
}

async fn send(
    d: &Daemon,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Vec<u8>>,
) -> u16 {
    let mut request = d.client.request(method, d.url(path)).bearer_auth(key);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    request.send().await.unwrap().status().as_u16()
}

async fn trail(d: &Daemon, query: &str) -> Value {
    let answer = d
        .client
        .get(d.url(&format!("/admin/v1/audit{query}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

#[tokio::test]
async fn admin_actions_and_refused_attempts_are_recorded_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let flags = [
        "-c",
        "1024",
        "-np",
        "1",
        "--api-key",
        USER,
        "--admin-api-key",
        ADMIN,
    ];
    let mut d = Daemon::start_on(dir.path(), &data, &flags);
    d.key = Some(USER.into());
    let mine = Uuid::new_v4().to_string();
    let scratch = Uuid::new_v4().to_string();
    for id in [&mine, &scratch] {
        d.ok(
            "/completion",
            json!({"prompt": "The audit trail", "n_predict": 1, "temperature": 0, "session_id": id}),
        )
        .await;
    }
    use reqwest::Method;
    // A user deleting their own conversation: not an admin action.
    assert_eq!(
        send(
            &d,
            Method::DELETE,
            &format!("/v1/sessions/{scratch}"),
            USER,
            None
        )
        .await,
        200
    );
    // A user trying an admin route: refused, and recorded.
    assert_eq!(
        send(
            &d,
            Method::POST,
            "/admin/v1/import/llama",
            USER,
            Some(b"x".to_vec())
        )
        .await,
        403
    );
    assert_eq!(
        send(&d, Method::GET, "/admin/v1/audit", USER, None).await,
        403
    );

    // An admin reading, forking and deleting a user's conversation.
    assert_eq!(
        send(
            &d,
            Method::GET,
            &format!("/v1/sessions/{mine}/snapshot"),
            ADMIN,
            None
        )
        .await,
        200
    );
    let fork = Uuid::new_v4().to_string();
    let body = json!({ "session_id": fork }).to_string().into_bytes();
    assert_eq!(
        send(
            &d,
            Method::POST,
            &format!("/v1/sessions/{mine}/fork"),
            ADMIN,
            Some(body)
        )
        .await,
        200
    );
    assert_eq!(
        send(
            &d,
            Method::DELETE,
            &format!("/v1/sessions/{fork}"),
            ADMIN,
            None
        )
        .await,
        200
    );
    let nobody = Uuid::new_v4().to_string();
    assert_eq!(
        send(
            &d,
            Method::DELETE,
            &format!("/v1/sessions/{nobody}"),
            ADMIN,
            None
        )
        .await,
        404
    );

    let expected = [
        (actor(USER), "import", "/admin/v1/import/llama", "403"),
        (actor(ADMIN), "download", mine.as_str(), "ok"),
        (actor(ADMIN), "fork", mine.as_str(), "ok"),
        (actor(ADMIN), "delete", fork.as_str(), "ok"),
        (actor(ADMIN), "delete", nobody.as_str(), "404"),
    ];
    let check = |page: &Value| {
        let entries = page["entries"]
            .as_array()
            .unwrap_or_else(|| panic!("{page}"));
        assert_eq!(entries.len(), expected.len(), "{page:#}");
        for (n, (entry, (who, action, target, outcome))) in
            entries.iter().zip(&expected).enumerate()
        {
            assert_eq!(entry["sequence"], n as u64 + 1, "{entry}");
            assert_eq!(entry["actor"], who.as_str(), "{entry}");
            assert_eq!(entry["action"], *action, "{entry}");
            assert_eq!(entry["target"], *target, "{entry}");
            let said = entry["outcome"].as_str().unwrap();
            assert!(said.starts_with(outcome), "{entry}");
            if *outcome != "ok" {
                assert!(said.len() > 10, "a refusal carries its sentence: {entry}");
            }
            assert!(
                entry["at_ms"].as_u64().unwrap() > 1_700_000_000_000,
                "{entry}"
            );
        }
    };
    check(&trail(&d, "").await);
    // No entry holds a key itself.
    let text = trail(&d, "").await.to_string();
    assert!(!text.contains(USER) && !text.contains(ADMIN));

    // Page by page.
    let first = trail(&d, "?limit=2").await;
    assert_eq!(first["entries"].as_array().unwrap().len(), 2);
    assert_eq!(first["next_after"], 2);
    let rest = trail(&d, "?after=2&limit=1000").await;
    assert_eq!(rest["entries"][0]["sequence"], 3);
    assert_eq!(rest["entries"].as_array().unwrap().len(), 3);
    let none = trail(&d, "?after=5").await;
    assert_eq!(none["entries"].as_array().unwrap().len(), 0);
    assert_eq!(none["next_after"], 5);
    assert_eq!(
        send(&d, Method::GET, "/admin/v1/audit?limit=0", ADMIN, None).await,
        400
    );

    // It is kept in the store: a restart reads the same trail.
    d.stop();
    let d = Daemon::start_on(dir.path(), &data, &flags);
    check(&trail(&d, "").await);

    // The CLI reads it too.
    let (ok, out, err) = common::cli(&["audit", "--server", &d.url(""), "--key", ADMIN]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines[3].contains("delete") && lines[3].contains(&fork),
        "{out}"
    );
    assert!(err.contains("5 audit entries"), "{err}");
    let (ok, out, _) = common::cli(&[
        "audit",
        "--server",
        &d.url(""),
        "--key",
        ADMIN,
        "--after",
        "3",
        "--json",
    ]);
    assert!(ok);
    let entries: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["sequence"], 4);
    let (ok, _, err) = common::cli(&["audit", "--server", &d.url(""), "--key", USER]);
    assert!(!ok && err.contains("admin"), "{err}");
}
