//! `kvsnap inspect FILE`: what a state file is and what it holds.
//!
//! Recognises kvsnap snapshots, llama.cpp sequence files (`ggsq` v3/v4) and whole-context files
//! (`ggsn`). Everything is parsed with the same bounds-checked readers the daemon uses, so a
//! malformed file gets a sentence, never a panic.

use std::fmt::Write;

use crate::snapshot::llama_file::{self, CONTEXT_MAGIC, SEQ_MAGIC};
use crate::snapshot::llama_state::{self, ParseOptions, SequenceState, ggml_type_name};
use crate::snapshot::{self, Snapshot};

/// A readable report of `bytes`, or why they are not a state file this knows.
pub fn inspect(bytes: &[u8]) -> Result<String, String> {
    if snapshot::is_snapshot(bytes) {
        return inspect_snapshot(bytes);
    }
    if crate::keys::is_sealed_file(bytes) {
        let sealed = crate::keys::sealed_parts(bytes).map_or(&[][..], |p| p.sealed);
        let key = crate::keys::sealed_key_id(sealed).unwrap_or("?");
        return Ok(format!(
            "sealed kvsnap snapshot (XChaCha20-Poly1305, key {key:?})\nsize: {} bytes\n\
             its contents are readable only by an instance whose key file lists that key: \
             `kvsnap import` it there\n",
            bytes.len()
        ));
    }
    match llama_file::magic(bytes) {
        Some(SEQ_MAGIC) => inspect_seq_file(bytes),
        Some(CONTEXT_MAGIC) => inspect_context_file(bytes),
        _ => Err(
            "not a state file kvsnap knows: expected a kvsnap snapshot, a llama.cpp ggsq \
             (sequence) or ggsn (context) file"
                .into(),
        ),
    }
}

fn inspect_snapshot(bytes: &[u8]) -> Result<String, String> {
    let snapshot = Snapshot::decode(bytes).map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "kvsnap snapshot, format version {}",
        snapshot.format_version
    );
    let _ = writeln!(out, "checksum: valid (blake3)");
    let _ = writeln!(out, "size: {} bytes", bytes.len());
    let m = &snapshot.model;
    let _ = writeln!(
        out,
        "model: {} ({} layers, embedding {}, vocabulary {}), file hash {}",
        m.architecture, m.n_layer, m.n_embd, m.n_vocab, m.file_hash
    );
    let l = &snapshot.layout;
    let _ = writeln!(
        out,
        "layout: flash attention {}, {} tokens per sequence, window {}, ubatch {}, {}",
        if l.flash_attention { "on" } else { "off" },
        l.n_ctx_per_sequence,
        l.n_swa,
        l.n_ubatch,
        l.llama_build
    );
    let _ = writeln!(
        out,
        "compute profile: {} (this kvsnap: {})",
        l.compute_profile
            .as_deref()
            .unwrap_or("unknown (written before profiles were recorded)"),
        crate::compute::THIS_BUILD
    );
    let _ = writeln!(
        out,
        "random stream: seed {}, position {}",
        snapshot.rng.seed, snapshot.rng.word_pos
    );
    token_lines(&mut out, &snapshot.tokens);
    let options = l.parse_options(llama_state::StateVersion::V4, u32::MAX);
    let state = llama_state::parse(&snapshot.sequence_state, options)
        .map_err(|e| format!("its llama.cpp state is malformed: {e}"))?;
    state_lines(&mut out, &state, snapshot.sequence_state.len());
    Ok(out)
}

fn inspect_seq_file(bytes: &[u8]) -> Result<String, String> {
    let file = llama_file::parse_seq_file(bytes).map_err(|e| e.to_string())?;
    let version = file.state_version().ok_or_else(|| {
        format!(
            "llama.cpp sequence file version {} is not one kvsnap reads (3 or 4)",
            file.version
        )
    })?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "llama.cpp sequence state (ggsq) v{}{}",
        file.version,
        if file.wrapped {
            ", token list wrapped as llama-server writes it"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "size: {} bytes (no checksum in this format)",
        bytes.len()
    );
    let _ = writeln!(
        out,
        "compute profile: unknown (llama.cpp's files do not record their build): continuing \
         it is not bit-exact"
    );
    token_lines(&mut out, &file.tokens);
    let section = &bytes[file.section_offset..];
    // The file does not say how many caches follow or whether cells carry an extension: try
    // the layouts llama.cpp writes, plain first.
    let mut last_error = String::new();
    for shape in llama_state::KNOWN_SHAPES {
        let options = ParseOptions {
            version,
            shape,
            max_cells: u32::MAX,
        };
        match llama_state::parse(section, options) {
            Ok(state) => {
                state_lines(&mut out, &state, section.len());
                return Ok(out);
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(format!("its memory section is malformed: {last_error}"))
}

fn inspect_context_file(bytes: &[u8]) -> Result<String, String> {
    let version = bytes
        .get(4..8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or("the file ends inside its header")?;
    let count = bytes
        .get(8..12)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or("the file ends inside its header")?;
    if 12 + 4 * count as usize > bytes.len() {
        return Err(format!(
            "the header announces {count} tokens but the file has only {} bytes",
            bytes.len()
        ));
    }
    Ok(format!(
        "llama.cpp whole-context state (ggsn) v{version}\nsize: {} bytes\ntokens: {count}\n\
         (context files hold every sequence plus logits; import a sequence file instead)\n",
        bytes.len()
    ))
}

fn token_lines(out: &mut String, tokens: &[i32]) {
    let shown: Vec<String> = tokens.iter().take(16).map(i32::to_string).collect();
    let more = if tokens.len() > 16 { " …" } else { "" };
    let _ = writeln!(out, "tokens: {} [{}{more}]", tokens.len(), shown.join(", "));
}

fn state_lines(out: &mut String, state: &SequenceState, bytes: usize) {
    let _ = writeln!(
        out,
        "memory section: {bytes} bytes, {} cache(s)",
        state.caches.len()
    );
    for (index, cache) in state.caches.iter().enumerate() {
        let Some(layout) = &cache.layout else {
            let _ = writeln!(out, "  cache {index}: {} streams, empty", cache.n_stream);
            continue;
        };
        let (min, max) = (
            cache.positions.iter().min().copied().unwrap_or(0),
            cache.positions.iter().max().copied().unwrap_or(0),
        );
        let k_row = layout.layers.first().map_or(0, |l| l.k_row_size);
        let rows = if layout.has_v {
            let mut types: Vec<String> = layout
                .layers
                .iter()
                .map(|l| format!("{}/{}", ggml_type_name(l.k_type), ggml_type_name(l.v_type)))
                .collect();
            types.dedup();
            format!(
                "K/V {}, K row {k_row} bytes, V {} bytes per cell{}",
                types.join(", "),
                layout.layers.first().map_or(0, |l| l.v_cell_size),
                if layout.v_trans { ", V transposed" } else { "" }
            )
        } else {
            let mut types: Vec<String> = layout
                .layers
                .iter()
                .map(|l| ggml_type_name(l.k_type))
                .collect();
            types.dedup();
            format!(
                "K {}, K row {k_row} bytes, no V (latent attention)",
                types.join(", ")
            )
        };
        let _ = writeln!(
            out,
            "  cache {index}: {} cells (positions {min}..={max}), {} layers, {rows}",
            cache.positions.len(),
            layout.layers.len(),
        );
    }
    if let Some(recurrent) = &state.recurrent {
        let layout = &recurrent.layout;
        let at = match recurrent.position {
            Some(position) => format!("read up to position {position}"),
            None => "empty".into(),
        };
        let first = layout.layers.first();
        let _ = writeln!(
            out,
            "  recurrent state: {at}, {} of {} layers, r {} bytes, s {} bytes per layer ({})",
            layout.layers.len(),
            layout.n_layer,
            first.map_or(0, |l| l.r_row_size),
            first.map_or(0, |l| l.s_row_size),
            first.map_or_else(|| "-".into(), |l| ggml_type_name(l.s_type)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &[u8] = include_bytes!("../tests/fixtures/llama-cpp/lighthouse.v3.ggsq");
    const V4: &[u8] = include_bytes!("../tests/fixtures/llama-cpp/lighthouse.v4.ggsq");

    #[test]
    fn a_recurrent_models_file_is_described() {
        use crate::snapshot::llama_state::{RecurrentLayer, RecurrentLayout, write_recurrent};
        let layer = RecurrentLayer {
            r_type: 0,
            r_row_size: 24,
            s_type: 0,
            s_row_size: 64,
        };
        let layout = RecurrentLayout {
            n_layer: 4,
            layers: vec![layer.clone(), layer],
        };
        let mut section = Vec::new();
        write_recurrent(&layout, Some(2), &[7; 176], &mut |piece| {
            section.extend_from_slice(piece)
        })
        .unwrap();
        let file = llama_file::write_seq_file(4, &[1, 2, 3], &section);
        let text = inspect(&file).unwrap();
        assert!(
            text.contains("0 cache(s)")
                && text.contains("recurrent state: read up to position 2, 2 of 4 layers"),
            "{text}"
        );
    }

    #[test]
    fn the_fixtures_are_described() {
        let v4 = inspect(V4).unwrap();
        assert!(v4.contains("ggsq) v4"), "{v4}");
        assert!(v4.contains("tokens: 50"), "{v4}");
        assert!(v4.contains("cache 0: 50 cells"), "{v4}");
        let v3 = inspect(V3).unwrap();
        assert!(v3.contains("wrapped"), "{v3}");
        assert!(v3.contains("tokens: 49"), "{v3}");
    }

    #[test]
    fn malformed_files_get_a_sentence_at_every_truncation_and_bit_flip() {
        for end in (0..V4.len()).step_by(331).chain(0..64) {
            if let Err(message) = inspect(&V4[..end]) {
                assert!(message.len() > 10);
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut flipped = V3.to_vec();
            let at = (seed as usize) % flipped.len();
            flipped[at] ^= 1 << (seed % 8);
            let _ = inspect(&flipped);
        }
        assert!(inspect(b"hello").is_err());
    }
}
