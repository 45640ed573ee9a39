//! The admin CLI against real daemons: `kvsnap sessions`, `export`, `import`, `import-llama`
//! and `migrate` are clients of the HTTP API and say what went wrong in a sentence.

mod common;

use common::{Daemon, cli};
use serde_json::json;
use uuid::Uuid;

const ADMIN: &str = "admin";
const V4: &[u8] = include_bytes!("fixtures/llama-cpp/lighthouse.v4.ggsq");

#[tokio::test]
async fn the_admin_cli_lists_exports_imports_moves_and_deletes_conversations() {
    // Flash attention on both, as the llama.cpp fixture was written.
    let args = [
        "-c",
        "4096",
        "-np",
        "2",
        "-fa",
        "on",
        "--admin-api-key",
        ADMIN,
    ];
    let b = Daemon::start(&args);
    let peer = format!("--peer={}={ADMIN}", b.base);
    let mut source_args = args.to_vec();
    source_args.push(&peer);
    let a = Daemon::start(&source_args);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let on_a = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--server", &a.base, "--key", ADMIN]);
        cli(&all)
    };

    let session = Uuid::new_v4().to_string();
    let reply = a
        .client
        .post(a.url("/completion"))
        .bearer_auth(ADMIN)
        .json(
            &json!({"prompt": "The lighthouse keeper counted the ships.", "n_predict": 4,
                      "temperature": 0, "session_id": session}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);

    let (ok, stdout, stderr) = on_a(&["sessions", "ls"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&session) && stdout.contains("resident"),
        "{stdout}"
    );
    let (ok, stdout, _) = on_a(&["sessions", "show", &session]);
    assert!(ok && stdout.contains("tokens"), "{stdout}");

    // A snapshot file round trip, checked by `inspect` on the way.
    let file = path("s.kvsnap");
    let (ok, stdout, stderr) = on_a(&["export", &session, "-o", &file]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote conversation"), "{stdout}");
    let (ok, stdout, _) = cli(&["inspect", &file]);
    assert!(ok && stdout.contains("checksum"), "{stdout}");
    let copy = Uuid::new_v4().to_string();
    let (ok, stdout, stderr) = on_a(&["import", &file, "--session", &copy]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&copy), "{stdout}");

    // llama.cpp's format both ways: a v4 file imports, and exports back byte for byte.
    let fixture = path("lighthouse.v4.ggsq");
    std::fs::write(&fixture, V4).unwrap();
    let imported = Uuid::new_v4().to_string();
    let (ok, stdout, stderr) = on_a(&["import-llama", &fixture, "--session", &imported]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("50 tokens"), "{stdout}");
    let back = path("back.ggsq");
    let (ok, _, stderr) = on_a(&["export", &imported, "--format", "llama", "-o", &back]);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read(&back).unwrap(), V4);

    // Bad input gets a sentence and a failing exit code, never a panic.
    let garbage = path("garbage");
    std::fs::write(&garbage, b"not a snapshot").unwrap();
    let (ok, _, stderr) = on_a(&["import", &garbage]);
    assert!(!ok && stderr.contains("not a kvsnap snapshot"), "{stderr}");
    let (ok, _, stderr) = on_a(&["import", &fixture]);
    assert!(!ok && stderr.contains("import-llama"), "{stderr}");
    let (ok, _, stderr) = cli(&["sessions", "ls", "--server", &a.base, "--key", "wrong"]);
    assert!(!ok && stderr.contains("API key"), "{stderr}");
    let (ok, _, stderr) = cli(&["sessions", "ls", "--server", "http://127.0.0.1:9"]);
    assert!(!ok && stderr.contains("cannot reach"), "{stderr}");

    // Migrate: the dry run lists, the real run moves and summarises.
    let migrate = |extra: &[&str]| {
        let mut args = vec![
            "migrate",
            "--from",
            &a.base,
            "--to",
            &b.base,
            "--key",
            ADMIN,
            "--session",
            &session,
            "--session",
            &copy,
        ];
        args.extend(extra);
        cli(&args)
    };
    let (ok, stdout, stderr) = migrate(&["--dry-run"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("2 conversation(s) would move"), "{stdout}");
    assert!(stdout.contains(&format!("move    {session}")), "{stdout}");
    let (ok, stdout, stderr) = migrate(&[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("moved 2 of 2"), "{stdout}");
    let (ok, stdout, _) = cli(&["sessions", "ls", "--server", &b.base, "--key", ADMIN]);
    assert!(
        ok && stdout.contains(&session) && stdout.contains(&copy),
        "{stdout}"
    );
    // The source no longer has them; it names where they went.
    let (ok, _, stderr) = on_a(&["sessions", "show", &session]);
    assert!(!ok && stderr.contains(&b.base), "{stderr}");

    let (ok, stdout, _) = on_a(&["sessions", "rm", &imported]);
    assert!(ok && stdout.contains("deleted"), "{stdout}");
    let (ok, _, stderr) = on_a(&["sessions", "show", &imported]);
    assert!(!ok && stderr.contains("no conversation"), "{stderr}");
}

#[test]
fn serve_help_describes_each_option_with_its_own_text() {
    let (ok, help, _) = cli(&["serve", "--help"]);
    assert!(ok);
    // The paragraph that follows a flag's line up to the next flag.
    let described = |flag: &str| -> String {
        let start = help
            .find(flag)
            .unwrap_or_else(|| panic!("{flag} missing:\n{help}"));
        let rest = &help[start + flag.len()..];
        let end = ["\n  -", "\n      --"]
            .iter()
            .filter_map(|next| rest.find(next))
            .min()
            .unwrap_or(rest.len());
        rest[..end].to_string()
    };
    let advertise = described("--advertise-url");
    assert!(advertise.contains("reached by the others"), "{advertise}");
    assert!(!advertise.contains("durable"), "{advertise}");
    assert!(described("--remote-durability").contains("durable"));
    assert!(described("--sleep-idle-seconds").contains("Unload the model"));
    assert!(described("--model").contains("SmolLM2-135M-Instruct"));
}
