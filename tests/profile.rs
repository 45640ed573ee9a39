//! The compute profile: what the built binary contains, what a daemon says about it, and that
//! a stored conversation continues to the same tokens under any thread count.

mod common;

use std::process::Command;

use common::{Daemon, long_prose};
use kvsnap::compute::{PROFILE_NAME, THIS_BUILD};
use serde_json::{Value, json};
use uuid::Uuid;

/// Every AMX mnemonic objdump prints (tile configuration, loads, stores, dot products).
const AMX_MNEMONICS: &[&str] = &[
    "ldtilecfg",
    "sttilecfg",
    "tilerelease",
    "tilezero",
    "tileloadd",
    "tileloaddt1",
    "tilestored",
    "tdpbssd",
    "tdpbsud",
    "tdpbusd",
    "tdpbuud",
    "tdpbf16ps",
    "tdpfp16ps",
    "tcmmimfp16ps",
    "tcmmrlfp16ps",
];

/// The mnemonic of each instruction line of `objdump -d` output.
fn mnemonics(disassembly: &str) -> impl Iterator<Item = &str> {
    disassembly.lines().filter_map(|line| {
        // "  4011d6:\tc4 e2 78 49 00 \tldtilecfg (%rax)" with --no-show-raw-insn:
        // "  4011d6:\tldtilecfg (%rax)"
        let (_, instruction) = line.split_once(":\t")?;
        instruction.split_whitespace().next()
    })
}

fn disassemble(args: &[&str]) -> String {
    let output = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "att"])
        .args(args)
        .arg(common::binary())
        .output()
        .expect("objdump runs (Debian's binutils; `make test` installs it)");
    assert!(output.status.success(), "objdump failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_built_binary_holds_no_amx_instruction() {
    let all = disassemble(&[]);
    let count = mnemonics(&all).count();
    assert!(count > 1_000_000, "objdump read only {count} instructions");
    let amx: Vec<&str> = mnemonics(&all)
        .filter(|m| AMX_MNEMONICS.contains(m))
        .collect();
    assert!(
        amx.is_empty(),
        "the binary contains AMX instructions ({} of them, first {:?}): ggml's AMX kernels crash \
         on AMX hosts (llama.cpp #20824); build only through a profile in config/compute/",
        amx.len(),
        amx.first()
    );
}

#[test]
fn llama_cpps_kernels_are_compiled_for_the_profile() {
    // The f16 dot product computes attention scores at every generated token: its registers
    // show which instructions llama.cpp was compiled for.
    let kernel = disassemble(&["--disassemble=ggml_vec_dot_f16"]);
    let instructions = mnemonics(&kernel).count();
    assert!(instructions > 20, "the kernel was not found:\n{kernel}");
    let uses = |register: &str| kernel.contains(register);
    match PROFILE_NAME {
        "avx512" => assert!(uses("%zmm"), "no AVX-512 register in the kernel:\n{kernel}"),
        "x86-64-v3" => {
            assert!(uses("%ymm"), "no AVX2 register in the kernel:\n{kernel}");
            assert!(!uses("%zmm"), "AVX-512 in a x86-64-v3 kernel:\n{kernel}");
        }
        other => eprintln!("profile {other}: no register check"),
    }
}

#[test]
fn the_version_names_the_compute_profile() {
    let (ok, stdout, _) = common::cli(&["--version"]);
    assert!(ok);
    assert!(
        stdout.contains(&format!("compute profile {THIS_BUILD}")),
        "{stdout}"
    );
}

/// A conversation longer than the sliding window: turn 1 greedy, turn 2 sampled from the
/// conversation's own stream (seeded on turn 1).
fn turn(session: &str, prompt: &str, first: bool) -> Value {
    let mut body = json!({"prompt": prompt, "session_id": session, "return_tokens": true,
                          "n_predict": 16, "temperature": 0.8});
    if first {
        body["seed"] = json!(5);
    }
    body
}

#[tokio::test]
async fn a_stored_conversation_continues_identically_under_one_or_two_threads() {
    let history = long_prose(540);
    let session = Uuid::new_v4().to_string();

    // Two threads: turn 1, then the snapshot, then turn 2 uninterrupted.
    let mut two = Daemon::start(&["-c", "4096", "-np", "2", "-t", "2", "--admin-api-key", "a"]);
    two.key = Some("a".into());
    // A real decode ran before the port opened: a kernel that cannot run here would have
    // ended the process at start.
    let log = two.stderr();
    let warmed = log
        .find("warm-up decode done")
        .expect("a warm-up decode at start");
    let listening = log.find("listening").expect("the port opened");
    assert!(
        warmed < listening,
        "the warm-up came before the port opened"
    );
    let identity = two.get_json("/admin/v1/identity").await;
    assert_eq!(
        identity["live"]["layout"]["compute_profile"],
        json!(THIS_BUILD),
        "{identity}"
    );
    let first = two.ok("/completion", turn(&session, &history, true)).await;
    let snapshot = two
        .get_bytes(&format!("/v1/sessions/{session}/snapshot"))
        .await;
    let follow_up = format!("{history}{} And then", first["content"].as_str().unwrap());
    let expected = two
        .ok("/completion", turn(&session, &follow_up, false))
        .await;
    drop(two);

    // One thread, another host as far as the snapshot knows: upload it, continue.
    let mut one = Daemon::start(&["-c", "4096", "-np", "2", "-t", "1", "--admin-api-key", "a"]);
    one.key = Some("a".into());
    let uploaded = one
        .client
        .put(one.url(&format!("/v1/sessions/{session}/snapshot")))
        .bearer_auth("a")
        .body(snapshot)
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 200);
    let info: Value = uploaded.json().await.unwrap();
    assert_eq!(info["compute_profile"], json!(THIS_BUILD), "{info}");
    assert_eq!(info["bit_exact"], json!(true), "{info}");
    let described = one.get_json(&format!("/v1/sessions/{session}")).await;
    assert_eq!(described["bit_exact"], json!(true), "{described}");
    let continued = one
        .ok("/completion", turn(&session, &follow_up, false))
        .await;
    assert!(
        continued["timings"]["cache_n"].as_u64().unwrap() > 500,
        "the history came from the snapshot: {continued}"
    );
    assert_eq!(
        continued["tokens"], expected["tokens"],
        "one thread continued differently than two"
    );
}

/// `bytes` (a snapshot file) as if written under `profile`.
fn relabelled(bytes: &[u8], profile: Option<&str>) -> Vec<u8> {
    let mut snapshot = kvsnap::snapshot::Snapshot::decode(bytes).expect("a snapshot");
    snapshot.layout.compute_profile = profile.map(str::to_string);
    snapshot.encode().expect("encodes")
}

#[tokio::test]
async fn another_profiles_state_restores_and_moves_but_is_reported_not_bit_exact() {
    const ADMIN: &str = "admin";
    let target = Daemon::start(&[
        "-c",
        "4096",
        "-np",
        "2",
        "-t",
        "1",
        "--admin-api-key",
        ADMIN,
    ]);
    let peer = format!("--peer={}={ADMIN}", target.base);
    let mut source = Daemon::start(&[
        "-c",
        "4096",
        "-np",
        "2",
        "-t",
        "1",
        "--admin-api-key",
        ADMIN,
        &peer,
    ]);
    source.key = Some(ADMIN.into());
    let native = Uuid::new_v4().to_string();
    let prompt = "The lighthouse keeper counted the ships";
    source.ok("/completion", turn(&native, prompt, true)).await;
    let bytes = source
        .get_bytes(&format!("/v1/sessions/{native}/snapshot"))
        .await;

    let upload = |session: &str, body: Vec<u8>| {
        source
            .client
            .put(source.url(&format!("/v1/sessions/{session}/snapshot")))
            .bearer_auth(ADMIN)
            .body(body)
            .send()
    };
    let foreign = Uuid::new_v4().to_string();
    let other = if PROFILE_NAME == "avx512" {
        "x86-64-v3"
    } else {
        "avx512"
    };
    let reply = upload(&foreign, relabelled(&bytes, Some(other)))
        .await
        .unwrap();
    assert_eq!(reply.status(), 200, "the state is valid under any profile");
    let info: Value = reply.json().await.unwrap();
    assert_eq!(info["compute_profile"], json!(other), "{info}");
    assert_eq!(info["bit_exact"], json!(false), "{info}");
    let why = info["exactness"].as_str().unwrap();
    assert!(
        why.starts_with("not bit-exact") && why.contains(other),
        "{why}"
    );
    let described = source.get_json(&format!("/v1/sessions/{foreign}")).await;
    assert_eq!(described["bit_exact"], json!(false), "{described}");

    // Written before profiles were recorded: unknown, so not bit-exact either.
    let old = Uuid::new_v4().to_string();
    let reply = upload(&old, relabelled(&bytes, None)).await.unwrap();
    let info: Value = reply.json().await.unwrap();
    assert_eq!(info["compute_profile"], Value::Null, "{info}");
    assert_eq!(info["bit_exact"], json!(false), "{info}");
    assert!(
        info["exactness"]
            .as_str()
            .unwrap()
            .contains("unknown compute profile")
    );

    // It continues here all the same, from its stored history.
    let continued = source.ok("/completion", turn(&foreign, prompt, true)).await;
    assert!(
        continued["timings"]["cache_n"].as_u64().unwrap() > 0,
        "{continued}"
    );
    let described = source.get_json(&format!("/v1/sessions/{foreign}")).await;
    assert_eq!(
        described["compute_profile"],
        json!(THIS_BUILD),
        "{described}"
    );

    // A dry run to a peer says, per conversation, which continue exactly there.
    let plan = source
        .ok(
            "/admin/v1/migrate",
            json!({"target": target.base, "all": true, "dry_run": true}),
        )
        .await;
    assert_eq!(plan["target_compute_profile"], json!(THIS_BUILD), "{plan}");
    let planned = |id: &str| {
        plan["would_move"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["session_id"] == json!(id))
            .cloned()
            .unwrap_or_else(|| panic!("{id} is not planned: {plan}"))
    };
    assert_eq!(planned(&native)["bit_exact"], json!(true), "{plan}");
    assert_eq!(planned(&old)["bit_exact"], json!(false), "{plan}");
    assert!(
        planned(&old)["exactness"]
            .as_str()
            .unwrap()
            .contains("unknown")
    );
    let (ok, stdout, stderr) = common::cli(&[
        "migrate",
        "--from",
        &source.base,
        "--to",
        &target.base,
        "--all",
        "--dry-run",
        "--key",
        ADMIN,
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("NOT bit-exact"), "{stdout}");

    // And the move itself goes through.
    let moved = source
        .ok(
            &format!("/admin/v1/sessions/{old}/migrate"),
            json!({"target": target.base}),
        )
        .await;
    assert_eq!(moved["outcome"], json!("moved"), "{moved}");
    let mut target = target;
    target.key = Some(ADMIN.into());
    let there = target.get_json(&format!("/v1/sessions/{old}")).await;
    assert_eq!(there["bit_exact"], json!(false), "{there}");
}
