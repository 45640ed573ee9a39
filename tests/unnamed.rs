//! Requests that name no conversation (chat frontends sending the whole history each time):
//! their state is kept as unnamed entries and found again by its tokens, after a `kill -9`,
//! and when other users took the sequence; exactly as the uninterrupted run continues; never
//! across keys; the storage budget drops them first; and two members of a fleet resume each
//! other's.

mod common;

use common::weed::Weed;
use common::{Daemon, long_prose};
use serde_json::{Value, json};

/// Gemma 3's window is 512 tokens: the system prompt alone is past it.
const ARGS: [&str; 4] = ["-c", "8192", "-np", "2"];

/// A frontend conversation: the whole history in every request, no session id.
struct Chat {
    messages: Vec<Value>,
    seed: Option<u64>,
}

/// What one turn answered.
#[derive(Debug)]
struct Turn {
    content: String,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
}

impl Chat {
    fn new(seed: Option<u64>) -> Chat {
        Chat {
            messages: vec![json!({
                "role": "system",
                "content": format!("You are the harbour's chronicler. {}", long_prose(450)),
            })],
            seed,
        }
    }

    async fn say(&mut self, d: &Daemon, key: Option<&str>, text: &str) -> Turn {
        self.say_in(d, key, text, None).await
    }

    /// `say`, in the named conversation `session` when one is given.
    async fn say_in(
        &mut self,
        d: &Daemon,
        key: Option<&str>,
        text: &str,
        session: Option<&str>,
    ) -> Turn {
        self.messages
            .push(json!({ "role": "user", "content": text }));
        let mut body = json!({
            "messages": self.messages,
            "max_tokens": 24,
        });
        if let Some(session) = session {
            body["session_id"] = json!(session);
        }
        match self.seed {
            Some(seed) => {
                body["seed"] = json!(seed);
                body["temperature"] = json!(0.9);
            }
            None => body["temperature"] = json!(0.0),
        }
        let mut request = d.client.post(d.url("/v1/chat/completions")).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{answer}");
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        self.messages
            .push(json!({ "role": "assistant", "content": content }));
        let usage = &answer["usage"];
        Turn {
            content,
            prompt_tokens: usage["prompt_tokens"].as_u64().unwrap(),
            cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
            completion_tokens: usage["completion_tokens"].as_u64().unwrap(),
        }
    }
}

const LINES: [&str; 4] = [
    "Tell me about the morning at the quay.",
    "What did the old woman say about the storm?",
    "And the children by the nets?",
    "Describe the chapel bell in one sentence.",
];

/// Until the writer committed at least `at_least` entries and nothing more for a while: every
/// entry the last turn handed it (a checkpoint inside its prompt, its own state) is kept.
/// Entries are queued, so nobody waits for them.
async fn entries_kept(d: &Daemon, at_least: f64) {
    let mut last = -1.0;
    let mut stable = 0;
    for _ in 0..200 {
        let kept = d.metric("kvsnap_entries_kept_total").await;
        if kept >= at_least && kept == last {
            stable += 1;
            if stable == 4 {
                return;
            }
        } else {
            stable = 0;
        }
        last = kept;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the unnamed entries were not kept");
}

#[tokio::test]
async fn an_anonymous_conversation_continues_after_kill_9_exactly_as_uninterrupted() {
    for seed in [None, Some(7)] {
        // The uninterrupted run: one daemon, the conversation resident throughout.
        let reference = Daemon::start(&ARGS);
        let mut chat = Chat::new(seed);
        let mut expected = Vec::new();
        for line in LINES {
            expected.push(chat.say(&reference, None, line).await.content);
        }
        drop(reference);

        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("kvsnap.redb");
        let d = Daemon::start_on(dir.path(), &data, &ARGS);
        let mut chat = Chat::new(seed);
        let mut history_tokens = 0;
        for (i, line) in LINES[..3].iter().enumerate() {
            let turn = chat.say(&d, None, line).await;
            assert_eq!(turn.content, expected[i], "seed {seed:?}, turn {i}");
            history_tokens = turn.prompt_tokens + turn.completion_tokens;
        }
        entries_kept(&d, 3.0).await;
        d.kill_9();

        let d = Daemon::start_on(dir.path(), &data, &ARGS);
        let turn = chat.say(&d, None, LINES[3]).await;
        assert_eq!(
            turn.content, expected[3],
            "seed {seed:?}: the turn after kill -9 continues as the uninterrupted run"
        );
        assert!(
            turn.cached_tokens as f64 >= 0.95 * history_tokens as f64,
            "seed {seed:?}: {} of the history's {history_tokens} tokens were restored",
            turn.cached_tokens
        );
        assert_eq!(d.metric("kvsnap_prefix_hits_total").await, 1.0);
    }
}

/// A system prompt past the window and past the window cache's 1,024 cells, so its cells wrap.
fn long_system() -> Value {
    json!({
        "role": "system",
        "content": format!("You are the harbour's chronicler. {}", long_prose(1000)),
    })
}

#[tokio::test]
async fn a_new_conversation_over_a_kept_prefix_answers_exactly_as_a_cold_start() {
    let question = "Which ships came in before noon, and who counted them?";
    for seed in [None, Some(11)] {
        // Cold: daemons that never saw the system prompt.
        let mut expected = Vec::new();
        for session in [None, Some(uuid::Uuid::new_v4().to_string())] {
            let cold = Daemon::start(&ARGS);
            let mut chat = Chat::new(seed);
            chat.messages[0] = long_system();
            let turn = chat.say_in(&cold, None, question, session.as_deref()).await;
            assert_eq!(turn.cached_tokens, 0);
            expected.push(turn);
        }
        // Warm: another conversation with the same system prompt came first.
        let warm = Daemon::start(&ARGS);
        let mut first = Chat::new(seed);
        first.messages[0] = long_system();
        first.say(&warm, None, LINES[0]).await;
        // Its checkpoint inside the system prompt, then its turn.
        entries_kept(&warm, 2.0).await;
        for (i, session) in [None, Some(uuid::Uuid::new_v4().to_string())]
            .iter()
            .enumerate()
        {
            let mut chat = Chat::new(seed);
            chat.messages[0] = long_system();
            let turn = chat.say_in(&warm, None, question, session.as_deref()).await;
            assert_eq!(
                turn.content,
                expected[i].content,
                "seed {seed:?}, named {}: a new conversation over a kept prefix answers as a \
                 cold start",
                session.is_some()
            );
            assert!(
                turn.cached_tokens >= 1024,
                "seed {seed:?}, named {}: {turn:?}",
                session.is_some()
            );
        }
    }
}

#[tokio::test]
async fn a_conversation_whose_sequence_others_took_resumes_from_its_entry() {
    // One sequence: every other user's request takes it.
    let d = Daemon::start(&["-c", "4096", "-np", "1"]);
    let mut mine = Chat::new(None);
    mine.say(&d, None, LINES[0]).await;
    entries_kept(&d, 1.0).await;
    let mut other = Chat::new(None);
    other.messages[0]["content"] = json!(format!("You count ships. {}", long_prose(300)));
    other.say(&d, None, "How many ships came in?").await;
    let before = mine.messages.len();
    let turn = mine.say(&d, None, LINES[1]).await;
    assert!(
        turn.cached_tokens + 40 >= turn.prompt_tokens,
        "{turn:?}: the history came back from its entry"
    );
    assert_eq!(mine.messages.len(), before + 2);
    assert_eq!(d.metric("kvsnap_prefix_hits_total").await, 1.0);
}

#[tokio::test]
async fn one_keys_entries_are_never_found_by_another_key() {
    let args = [
        "-c",
        "4096",
        "-np",
        "1",
        "--api-key",
        "key-a",
        "--api-key",
        "key-b",
    ];
    let mut d = Daemon::start(&args);
    d.key = Some("key-a".into());
    let mut a = Chat::new(None);
    a.say(&d, Some("key-a"), LINES[0]).await;
    entries_kept(&d, 1.0).await;
    // Key b sends key a's whole history: nothing of a's is reused, from the sequence or the
    // store.
    let mut b = Chat {
        messages: a.messages.clone(),
        seed: None,
    };
    let turn = b.say(&d, Some("key-b"), LINES[1]).await;
    assert_eq!(turn.cached_tokens, 0, "{turn:?}");
    entries_kept(&d, 2.0).await;
    // Key a, after key b took the sequence, still resumes its own.
    let turn = a.say(&d, Some("key-a"), LINES[1]).await;
    assert!(turn.cached_tokens > 500, "{turn:?}");
    assert_eq!(d.metric("kvsnap_prefix_hits_total").await, 1.0);
}

#[tokio::test]
async fn the_budget_drops_unnamed_entries_first_and_frees_their_pages() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    // About what two conversations of this size hold.
    let budget = 24 * 1024 * 1024;
    let budget_arg = budget.to_string();
    let args = ["-c", "4096", "-np", "1", "--store-budget", &budget_arg];
    let d = Daemon::start_on(dir.path(), &data, &args);
    // A named conversation, saved after its turn.
    let named = d
        .ok(
            "/completion",
            json!({
                "prompt": long_prose(400),
                "n_predict": 4,
                "session_id": "00000000-0000-4000-8000-000000000001",
            }),
        )
        .await;
    assert!(named["tokens_evaluated"].as_u64().unwrap() > 400);
    // Six anonymous conversations, each of its own.
    for i in 0..6 {
        let mut chat = Chat::new(None);
        chat.messages[0]["content"] = json!(format!("Story number {i}. {}", long_prose(500)));
        chat.say(&d, None, LINES[0]).await;
        entries_kept(&d, (i + 1) as f64).await;
    }
    // What an admin sees of it, through the API and the CLI.
    let usage = d.get_ok_json("/admin/v1/store").await;
    assert!(usage["unnamed_entries"].as_u64().unwrap() >= 1, "{usage}");
    assert!(usage["page_bytes"].as_u64().unwrap() <= budget, "{usage}");
    assert_eq!(usage["budget_bytes"].as_u64().unwrap(), budget);
    assert!(d.metric("kvsnap_entries_dropped_total").await >= 1.0);
    let (ok, stdout, stderr) = common::cli(&["sessions", "usage", "--server", &d.base]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("unnamed entries"), "{stdout}");
    d.stop();
    let store = kvsnap::store::Store::open(&data).unwrap();
    let stats = store.entry_stats().unwrap();
    assert!(
        stats.page_bytes <= budget,
        "the store holds {} page bytes, over its budget of {budget}",
        stats.page_bytes
    );
    assert!(
        stats.entries >= 1 && stats.entries < 6,
        "older entries were dropped, the newest kept: {stats:?}"
    );
    assert!(store.check().unwrap().is_empty(), "{:?}", store.check());
    // The named conversation is whole.
    use kvsnap::store::SessionStore;
    let id = uuid::Uuid::parse_str("00000000-0000-4000-8000-000000000001").unwrap();
    assert!(store.record(id).unwrap().is_some());
    assert!(store.manifest(id).unwrap().is_some());
}

#[tokio::test]
async fn a_regenerated_anonymous_reply_is_the_first_one_again() {
    let d = Daemon::start(&ARGS);
    let mut chat = Chat::new(Some(5));
    chat.say(&d, None, LINES[0]).await;
    let first = chat.say(&d, None, LINES[1]).await;
    entries_kept(&d, 2.0).await;
    // The frontend's "regenerate": the same history and question, the reply dropped. The
    // sequence holds that reply; cut back, it would not be the state the first attempt
    // started from, so the previous turn's entry is restored instead.
    chat.messages.truncate(chat.messages.len() - 2);
    let again = chat.say(&d, None, LINES[1]).await;
    assert_eq!(
        again.content, first.content,
        "the same seed, the same start"
    );
    assert_eq!(
        again.cached_tokens, first.cached_tokens,
        "{again:?} {first:?}"
    );
    assert!(d.metric("kvsnap_prefix_hits_total").await >= 1.0);
}

/// Until `d` has handed everything it kept to the fleet's bucket.
async fn uploads_settle(d: &Daemon) {
    for _ in 0..300 {
        let health = d.get_json("/health").await;
        if health["remote"]["pending_uploads"] == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the uploads did not finish");
}

#[tokio::test]
async fn two_fleet_members_without_affinity_resume_each_others_anonymous_turns() {
    // Two daemons at once: one thread each. The reference runs the same way.
    let args = ["-c", "8192", "-np", "2", "-t", "1"];
    let weed = Weed::start("kvsnap-unnamed").await;
    for (round, seed) in [None, Some(11)].into_iter().enumerate() {
        let reference = Daemon::start(&args);
        let mut chat = Chat::new(seed);
        let mut expected = Vec::new();
        for line in LINES {
            expected.push(chat.say(&reference, None, line).await.content);
        }
        drop(reference);

        let url = weed.url(&format!("round-{round}"));
        let fleet_args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--remote", &url, "--remote-durability", "async"])
            .collect();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let members: Vec<Daemon> = dirs
            .iter()
            .map(|dir| {
                let data = dir.path().join("kvsnap.redb");
                Daemon::start_with_env(dir.path(), &data, &fleet_args, &weed.env())
            })
            .collect();
        // A balancer without affinity: the turns alternate between the members.
        let mut chat = Chat::new(seed);
        let mut history_tokens = 0;
        let mut kept = [0.0, 0.0];
        for (i, line) in LINES.iter().enumerate() {
            let member = &members[i % 2];
            let turn = chat.say(member, None, line).await;
            assert_eq!(turn.content, expected[i], "seed {seed:?}, turn {i}");
            if i > 0 {
                assert!(
                    turn.cached_tokens as f64 >= 0.95 * history_tokens as f64,
                    "seed {seed:?}, turn {i}: {} of the history's {history_tokens} tokens \
                     were restored",
                    turn.cached_tokens
                );
            }
            history_tokens = turn.prompt_tokens + turn.completion_tokens;
            kept[i % 2] += 1.0;
            entries_kept(member, kept[i % 2]).await;
            uploads_settle(member).await;
        }
        for member in &members {
            assert!(member.metric("kvsnap_remote_entry_fetches_total").await >= 1.0);
        }
        // A new named conversation over the same system prompt, on the member that never kept
        // its checkpoint: it starts from the one the other member put in the bucket, and
        // answers as a daemon that never saw the prompt.
        let session = format!("00000000-0000-4000-8000-00000000000{round}");
        let cold = Daemon::start(&args);
        let mut fresh = Chat::new(seed);
        let expected = fresh.say_in(&cold, None, LINES[2], Some(&session)).await;
        drop(cold);
        let fetched = members[1].metric("kvsnap_remote_entry_fetches_total").await;
        let mut fresh = Chat::new(seed);
        let turn = fresh
            .say_in(&members[1], None, LINES[2], Some(&session))
            .await;
        assert_eq!(turn.content, expected.content, "seed {seed:?}");
        assert!(turn.cached_tokens >= 512, "{turn:?}");
        assert_eq!(
            members[1].metric("kvsnap_remote_entry_fetches_total").await,
            fetched + 1.0
        );
    }
}

#[tokio::test]
async fn without_saves_every_turn_anonymous_states_are_kept_at_eviction_and_at_shutdown() {
    for policy in ["evict", "shutdown"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("kvsnap.redb");
        let args = ["-c", "8192", "-np", "1", "--persist", policy];
        let d = Daemon::start_on(dir.path(), &data, &args);
        let mut mine = Chat::new(None);
        let first = mine.say(&d, None, LINES[0]).await;
        // Another user takes the only sequence: mine is kept as it leaves.
        let mut other = Chat::new(None);
        other.messages[0]["content"] =
            json!(format!("You keep the lighthouse. {}", long_prose(300)));
        other.say(&d, None, LINES[1]).await;
        entries_kept(&d, 1.0).await;
        let turn = mine.say(&d, None, LINES[1]).await;
        let history = first.prompt_tokens + first.completion_tokens;
        assert!(
            turn.cached_tokens as f64 >= 0.95 * history as f64,
            "{policy}: evicted, then {turn:?} of {history}"
        );
        // A graceful stop keeps what the sequence holds; the restart resumes it.
        let history = turn.prompt_tokens + turn.completion_tokens;
        d.stop();
        let d = Daemon::start_on(dir.path(), &data, &args);
        let turn = mine.say(&d, None, LINES[2]).await;
        assert!(
            turn.cached_tokens as f64 >= 0.95 * history as f64,
            "{policy}: restarted, then {turn:?} of {history}"
        );
    }
}

#[tokio::test]
async fn a_prefix_computed_cold_again_keeps_no_second_checkpoint() {
    let d = Daemon::start(&["-c", "8192", "-np", "1"]);
    let mut chat = Chat::new(None);
    chat.messages[0] = long_system();
    chat.say(&d, None, LINES[0]).await;
    entries_kept(&d, 2.0).await;
    let kept = d.metric("kvsnap_entries_kept_total").await;
    let held = d.get_ok_json("/admin/v1/store").await["unnamed_entries"]
        .as_u64()
        .unwrap();
    // The same first request again, asking for no cached prefix: computed cold, it reaches
    // the same checkpoints, which are kept once.
    let first_request = json!({
        "messages": chat.messages[..2].to_vec(),
        "max_tokens": 24,
        "temperature": 0.0,
        "cache_prompt": false,
    });
    d.ok("/v1/chat/completions", first_request).await;
    // It asked for no caching, so its own turn is not kept either. The writer takes jobs in
    // order: once a later, short conversation's entry (no checkpoint below 128 tokens) is
    // kept, whatever the cold request handed it was dealt with.
    let mut short = Chat::new(None);
    short.messages[0]["content"] = json!(format!("Be brief. {}", long_prose(50)));
    short.say(&d, None, LINES[0]).await;
    entries_kept(&d, kept + 1.0).await;
    assert_eq!(d.metric("kvsnap_entries_kept_total").await, kept + 1.0);
    let now = d.get_ok_json("/admin/v1/store").await["unnamed_entries"]
        .as_u64()
        .unwrap();
    assert_eq!(now, held + 1);
}
