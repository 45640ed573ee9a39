//! Writes a seed corpus for every fuzz target into the directory given (one folder per
//! target): small valid inputs built in code (`inputs.rs`), and the starts of llama.cpp's own
//! files (tests/fixtures/llama-cpp/). Small on purpose: a fuzzer's speed is its input's size,
//! and `make fuzz` runs each target ten million times.

use std::fs;
use std::path::Path;

use kvsnap::snapshot::llama_file::write_seq_file;
use kvsnap::snapshot::llama_state::StateVersion;
use kvsnap::snapshot::manifest::Manifest;
use kvsnap::snapshot::{LiveIdentity, MAGIC, Snapshot};
use kvsnap::store::records::{AuditRecord, ForwardRecord, IncomingRecord, RECORD_VERSION};
use kvsnap::store::remote::{Lease, RemoteConversation};

#[path = "checks.rs"]
#[allow(dead_code)]
mod checks;
#[path = "inputs.rs"]
#[allow(dead_code)]
mod inputs;

use inputs::Shape;

const V3: &[u8] = include_bytes!("../fixtures/llama-cpp/lighthouse.v3.ggsq");
const V4: &[u8] = include_bytes!("../fixtures/llama-cpp/lighthouse.v4.ggsq");
/// How much of a real file a seed keeps: its header, cells and first rows.
const PREFIX: usize = 4096;

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: seeds DIR (each target's corpus is written to DIR/TARGET)");
    let out = Path::new(&out);
    let mut count = 0;
    let mut write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = out.join(target);
        fs::create_dir_all(&dir).expect("the corpus folder can be made");
        fs::write(dir.join(name), bytes).expect("a seed can be written");
        count += 1;
    };

    let shapes = shapes();
    for (i, shape) in shapes.iter().enumerate() {
        let section = inputs::section(shape);
        write(
            "llama_state",
            &format!("shape-{i}"),
            &[&[options_byte(shape)][..], &section].concat(),
        );
        let version = if shape.version == StateVersion::V4 {
            4
        } else {
            3
        };
        let tokens: Vec<i32> = (0..6).collect();
        let file = write_seq_file(version, &tokens, &section);
        write("seq_file", &format!("shape-{i}"), &file);
        write("inspect", &format!("ggsq-{i}"), &file);
    }
    // llama.cpp's own files: their real headers, cells and layer descriptions.
    let v4_section = inputs::memory_section(V4);
    write(
        "llama_state",
        "lighthouse-v4",
        &prefix(&[&[4u8 | 16][..], v4_section]),
    );
    write(
        "llama_state",
        "lighthouse-v3",
        &prefix(&[&[1u8 | 4 | 16][..], inputs::memory_section(V3)]),
    );
    for (name, file) in [("lighthouse-v3", V3), ("lighthouse-v4", V4)] {
        write("seq_file", name, &file[..PREFIX]);
        write("inspect", name, &file[..PREFIX]);
    }
    // llama-server's wrapped token list, and a whole-context file's header.
    let wrapped = [-1, 1, 3, 5, 6, 7, 0];
    write("seq_file", "wrapped", &write_seq_file(3, &wrapped, &[]));
    write(
        "inspect",
        "ggsn",
        &[&b"nsgg"[..], &[1, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0]].concat(),
    );

    // Snapshots the target's live identity accepts, and two it does not (V transposed, cells
    // with extensions); each whole, and as the body the target frames itself.
    for (i, (v_trans, cell_ext)) in [(false, false), (true, false), (false, true)]
        .into_iter()
        .enumerate()
    {
        let shape = inputs::small_shape(6, v_trans, cell_ext);
        let live: LiveIdentity = inputs::identity(shape.layouts(), cell_ext);
        let section = inputs::section(&shape);
        let file = inputs::snapshot(&live, 6, &section)
            .encode()
            .expect("it fits");
        assert!(Snapshot::decode(&file).is_ok());
        let body = &file[MAGIC.len()..file.len() - 32];
        write(
            "snapshot",
            &format!("file-{i}"),
            &[&[0u8][..], &file].concat(),
        );
        write(
            "snapshot",
            &format!("body-{i}"),
            &[&[1u8][..], body].concat(),
        );
        write(
            "snapshot",
            &format!("body-v1-{i}"),
            &[&[2u8][..], body].concat(),
        );
        write("inspect", &format!("snapshot-{i}"), &file);
        let ring = checks::fixed_ring();
        write(
            "sealed",
            &format!("file-{i}"),
            &kvsnap::keys::sealed_file(ring, &file, Some("owner")),
        );

        let (manifest, _) = Manifest::cut_file(&file, None).expect("it cuts");
        let encoded = manifest.encode();
        let manifest_body = &encoded[8..encoded.len() - 32];
        write(
            "manifest",
            &format!("whole-{i}"),
            &[&[0u8][..], &encoded].concat(),
        );
        write(
            "manifest",
            &format!("body-{i}"),
            &[&[1u8][..], manifest_body].concat(),
        );
    }

    for (i, record) in records().iter().enumerate() {
        write("records", &format!("record-{i}"), record);
        let sealed = checks::fixed_ring().seal(checks::SEALED_PLACE, record);
        write("sealed", &format!("record-{i}"), &sealed);
    }
    println!("wrote {count} seeds under {}", out.display());
}

/// The first byte `checks::options_from` reads as this shape's parse options.
fn options_byte(shape: &Shape) -> u8 {
    let version = u8::from(shape.version == StateVersion::V3);
    version
        | (shape.caches.len() as u8) << 1
        | u8::from(shape.cell_ext) << 3
        | u8::from(shape.recurrent.is_some()) << 5
}

fn prefix(parts: &[&[u8]]) -> Vec<u8> {
    let mut bytes = parts.concat();
    bytes.truncate(PREFIX);
    bytes
}

/// Sections of every kind the parser meets: V by row and transposed, cells with extensions,
/// llama.cpp's v3, several streams, an empty cache, one cache, recurrent states.
fn shapes() -> Vec<Shape> {
    let mut shapes = Vec::new();
    for v_trans in [false, true] {
        for cell_ext in [false, true] {
            shapes.push(inputs::small_shape(5, v_trans, cell_ext));
        }
    }
    let mut v3 = inputs::small_shape(4, false, false);
    v3.version = StateVersion::V3;
    shapes.push(v3);
    let mut streams = inputs::small_shape(3, true, false);
    streams.n_stream = 3;
    shapes.push(streams);
    let mut empty = inputs::small_shape(3, false, false);
    empty.caches[1].positions.clear();
    shapes.push(empty);
    let mut one = inputs::small_shape(7, false, false);
    one.caches.truncate(1);
    shapes.push(one.clone());
    // A hybrid (a cache, then a recurrent state) and a recurrent model (no cache at all).
    let recurrent = inputs::Recurrent {
        position: Some(6),
        n_layer: 3,
        layers: vec![(12, 8), (12, 0)],
    };
    let mut hybrid = one;
    hybrid.recurrent = Some(recurrent);
    shapes.push(hybrid.clone());
    hybrid.caches.clear();
    shapes.push(hybrid);
    shapes
}

/// One of each record, as the store writes them.
fn records() -> Vec<Vec<u8>> {
    let session = inputs::session_record();
    let object = RemoteConversation {
        lease: Some(Lease {
            instance: 7,
            url: "http://127.0.0.1:8080".into(),
            epoch: 3,
            expires_ms: 9,
        }),
        record: session.clone(),
        manifest: vec![1, 2, 3],
        refs: vec![0; 64],
    };
    vec![
        session.encode(),
        ForwardRecord {
            record_version: RECORD_VERSION,
            target: "http://127.0.0.1:8081".into(),
            moved_ms: 5,
        }
        .encode(),
        IncomingRecord {
            record_version: RECORD_VERSION,
            owner: None,
            created_ms: 1,
            checksum: "cd".repeat(32),
            manifest: vec![9; 40],
            offered_ms: 4,
        }
        .encode(),
        AuditRecord::now("open".into(), "import", "x".into(), "ok".into())
            .with_detail("from a test".into())
            .encode(),
        rmp_serde::to_vec_named(&object).expect("it serializes"),
    ]
}
