"""Writes a tiny random-weight GGUF model of one llama.cpp memory kind, for tests.

    python3 tests/models/tiny_model.py KIND OUT.gguf TOKENIZER.gguf

Its text is noise, but llama.cpp loads it as a model of that architecture and keeps real state
of that kind (a recurrent state, an MLA cache, ...), which is what kvsnap's tests need. The
tokenizer (vocabulary, merges, special tokens, chat template) is copied from TOKENIZER, a real
model: a made-up vocabulary would test llama.cpp's tokenizer checks instead.

The weights come from a fixed seed, so the same KIND writes the same file. Needs PyPI's `gguf`
(and its numpy); `make test` installs both under .cache/pydeps.
"""

import sys

import numpy as np
import gguf

# Small enough to write in a second, large enough for several pages of state per sequence.
N_EMBD = 64
N_LAYER = 2
CONTEXT = 4096


def copy_tokenizer(writer, source):
    """Every tokenizer.* key of `source`, with its type, into `writer`."""
    reader = gguf.GGUFReader(source)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), kind)
    return len(reader.fields["tokenizer.ggml.tokens"].data)


class Weights:
    """Random tensors with a fixed seed; shapes as numpy orders them (llama.cpp's reversed)."""

    def __init__(self, writer):
        self.writer = writer
        self.random = np.random.default_rng(7)

    def normal(self, name, *shape, scale=0.02):
        self.writer.add_tensor(name, (self.random.standard_normal(shape) * scale).astype(np.float32))

    def ones(self, name, *shape):
        self.writer.add_tensor(name, np.ones(shape, dtype=np.float32))

    def values(self, name, array):
        self.writer.add_tensor(name, array.astype(np.float32))


def shape_keys(writer, arch, n_ff, n_head, n_head_kv=None, rms_eps=1e-6, n_layer=N_LAYER,
               context=CONTEXT):
    """The keys every architecture here has: sizes, layer count, heads, norm epsilon."""
    writer.add_uint32(f"{arch}.context_length", context)
    writer.add_uint32(f"{arch}.embedding_length", N_EMBD)
    writer.add_uint32(f"{arch}.feed_forward_length", n_ff)
    writer.add_uint32(f"{arch}.block_count", n_layer)
    writer.add_uint32(f"{arch}.attention.head_count", n_head)
    if n_head_kv is not None:
        writer.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", rms_eps)


def embeddings(weights, n_vocab):
    """The token embedding (also the output, tied) and the final norm."""
    weights.normal("token_embd.weight", n_vocab, N_EMBD)
    weights.ones("output_norm.weight", N_EMBD)


def ssm_keys(writer, arch, d_conv, d_inner, d_state, dt_rank):
    """The keys of a Mamba-style model: no attention, and its state space's sizes."""
    shape_keys(writer, arch, n_ff=0, n_head=0, rms_eps=1e-5)
    writer.add_uint32(f"{arch}.ssm.conv_kernel", d_conv)
    writer.add_uint32(f"{arch}.ssm.inner_size", d_inner)
    writer.add_uint32(f"{arch}.ssm.state_size", d_state)
    writer.add_uint32(f"{arch}.ssm.time_step_rank", dt_rank)


def mamba(writer, weights, n_vocab, arch):
    """Mamba 1: a recurrent state (conv and ssm rows) per layer, no KV cache."""
    d_inner, d_state, d_conv, dt_rank = 2 * N_EMBD, 16, 4, 8
    ssm_keys(writer, arch, d_conv, d_inner, d_state, dt_rank)
    embeddings(weights, n_vocab)
    for i in range(N_LAYER):
        block = f"blk.{i}"
        weights.ones(f"{block}.attn_norm.weight", N_EMBD)
        weights.normal(f"{block}.ssm_in.weight", 2 * d_inner, N_EMBD)
        weights.normal(f"{block}.ssm_conv1d.weight", d_inner, d_conv, scale=0.2)
        weights.normal(f"{block}.ssm_conv1d.bias", d_inner)
        weights.normal(f"{block}.ssm_x.weight", dt_rank + 2 * d_state, d_inner)
        weights.normal(f"{block}.ssm_dt.weight", d_inner, dt_rank, scale=0.2)
        weights.normal(f"{block}.ssm_dt.bias", d_inner)
        # A is negative (A = -exp(A_log)), so the state decays instead of growing without bound.
        weights.values(f"{block}.ssm_a", -np.exp(weights.random.standard_normal((d_inner, d_state)) * 0.5))
        weights.ones(f"{block}.ssm_d", d_inner)
        weights.normal(f"{block}.ssm_out.weight", N_EMBD, d_inner)


def mamba2(writer, weights, n_vocab, arch):
    """Mamba 2: a recurrent state of conv rows and per-head ssm states, no KV cache."""
    d_inner, d_state, d_conv, n_head, n_group = 2 * N_EMBD, 16, 4, 8, 1
    conv_dim = d_inner + 2 * n_group * d_state
    ssm_keys(writer, arch, d_conv, d_inner, d_state, n_head)
    writer.add_uint32(f"{arch}.ssm.group_count", n_group)
    embeddings(weights, n_vocab)
    for i in range(N_LAYER):
        block = f"blk.{i}"
        weights.ones(f"{block}.attn_norm.weight", N_EMBD)
        weights.normal(f"{block}.ssm_in.weight", d_inner + conv_dim + n_head, N_EMBD)
        weights.normal(f"{block}.ssm_conv1d.weight", conv_dim, d_conv, scale=0.2)
        weights.normal(f"{block}.ssm_conv1d.bias", conv_dim)
        weights.normal(f"{block}.ssm_dt.bias", n_head)
        # A is negative, so the state decays instead of growing without bound.
        weights.values(f"{block}.ssm_a", -np.exp(weights.random.standard_normal((n_head, 1)) * 0.5))
        weights.ones(f"{block}.ssm_d", n_head, 1)
        weights.ones(f"{block}.ssm_norm.weight", n_group, d_inner // n_group)
        weights.normal(f"{block}.ssm_out.weight", N_EMBD, d_inner)


def attention_block(weights, block, n_head_kv, head_dim, n_ff):
    """One pre-norm attention and SwiGLU block, as llama-like architectures name them."""
    n_embd_gqa = n_head_kv * head_dim
    weights.ones(f"{block}.attn_norm.weight", N_EMBD)
    weights.normal(f"{block}.attn_q.weight", N_EMBD, N_EMBD)
    weights.normal(f"{block}.attn_k.weight", n_embd_gqa, N_EMBD)
    weights.normal(f"{block}.attn_v.weight", n_embd_gqa, N_EMBD)
    weights.normal(f"{block}.attn_output.weight", N_EMBD, N_EMBD)
    ffn_block(weights, block, n_ff)


def ffn_block(weights, block, n_ff):
    """A block's pre-norm SwiGLU feed-forward part."""
    weights.ones(f"{block}.ffn_norm.weight", N_EMBD)
    weights.normal(f"{block}.ffn_gate.weight", n_ff, N_EMBD)
    weights.normal(f"{block}.ffn_up.weight", n_ff, N_EMBD)
    weights.normal(f"{block}.ffn_down.weight", N_EMBD, n_ff)


def qwen2vl(writer, weights, n_vocab, arch):
    """Qwen2-VL: M-RoPE, so every KV cell carries llama.cpp's cell extension."""
    n_head, n_head_kv, n_ff = 4, 2, 128
    head_dim = N_EMBD // n_head
    shape_keys(writer, arch, n_ff, n_head, n_head_kv)
    writer.add_float32(f"{arch}.rope.freq_base", 1000000.0)
    # The rotary half of a head split between time, height, width (and an unused fourth).
    writer.add_array(f"{arch}.rope.dimension_sections", [2, 3, 3, 0])
    embeddings(weights, n_vocab)
    for i in range(N_LAYER):
        attention_block(weights, f"blk.{i}", n_head_kv, head_dim, n_ff)


def deepseek2(writer, weights, n_vocab, arch):
    """DeepSeek 2 with multi-head latent attention: the cache holds one compressed K row per
    token (the latent and the rotary part) and no V at all."""
    n_head, n_ff = 4, 128
    kv_lora_rank, n_rot, qk_nope, v_head = 32, 8, 16, 16
    shape_keys(writer, arch, n_ff, n_head, n_head_kv=1)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_uint32(f"{arch}.rope.dimension_count", n_rot)
    # The cache's K row is the latent plus the rotary part; "V" is the latent itself.
    writer.add_uint32(f"{arch}.attention.key_length", kv_lora_rank + n_rot)
    writer.add_uint32(f"{arch}.attention.value_length", kv_lora_rank)
    writer.add_uint32(f"{arch}.attention.key_length_mla", qk_nope + n_rot)
    writer.add_uint32(f"{arch}.attention.value_length_mla", v_head)
    writer.add_uint32(f"{arch}.attention.q_lora_rank", 0)
    writer.add_uint32(f"{arch}.attention.kv_lora_rank", kv_lora_rank)
    # Every block dense: no experts.
    writer.add_uint32(f"{arch}.leading_dense_block_count", N_LAYER)
    writer.add_uint32(f"{arch}.expert_feed_forward_length", 0)
    writer.add_uint32(f"{arch}.expert_shared_count", 0)
    embeddings(weights, n_vocab)
    for i in range(N_LAYER):
        block = f"blk.{i}"
        weights.ones(f"{block}.attn_norm.weight", N_EMBD)
        weights.ones(f"{block}.attn_kv_a_norm.weight", kv_lora_rank)
        weights.normal(f"{block}.attn_q.weight", n_head * (qk_nope + n_rot), N_EMBD)
        weights.normal(f"{block}.attn_kv_a_mqa.weight", kv_lora_rank + n_rot, N_EMBD)
        weights.normal(f"{block}.attn_k_b.weight", n_head, kv_lora_rank, qk_nope)
        weights.normal(f"{block}.attn_v_b.weight", n_head, v_head, kv_lora_rank)
        weights.normal(f"{block}.attn_output.weight", N_EMBD, n_head * v_head)
        ffn_block(weights, block, n_ff)


def lfm2(writer, weights, n_vocab, arch):
    """LFM2, a hybrid: short-convolution layers (a recurrent state of conv rows and no s rows)
    beside attention layers (a KV cache). A layer with no KV heads is a convolution layer."""
    n_head, n_head_kv, n_ff, l_cache = 4, 2, 128, 3
    head_dim = N_EMBD // n_head
    kv_heads = [0 if i % 2 == 0 else n_head_kv for i in range(N_LAYER)]
    shape_keys(writer, arch, n_ff, n_head, rms_eps=1e-5)
    writer.add_array(f"{arch}.attention.head_count_kv", kv_heads)
    writer.add_uint32(f"{arch}.shortconv.l_cache", l_cache)
    weights.normal("token_embd.weight", n_vocab, N_EMBD)
    # LFM2's final norm is named like an embedding norm in its GGUF files.
    weights.ones("token_embd_norm.weight", N_EMBD)
    for i, heads in enumerate(kv_heads):
        block = f"blk.{i}"
        if heads:
            attention_block(weights, block, heads, head_dim, n_ff)
            weights.ones(f"{block}.attn_q_norm.weight", head_dim)
            weights.ones(f"{block}.attn_k_norm.weight", head_dim)
            continue
        weights.ones(f"{block}.attn_norm.weight", N_EMBD)
        weights.normal(f"{block}.shortconv.conv.weight", N_EMBD, l_cache, scale=0.2)
        weights.normal(f"{block}.shortconv.in_proj.weight", 3 * N_EMBD, N_EMBD)
        weights.normal(f"{block}.shortconv.out_proj.weight", N_EMBD, N_EMBD)
        ffn_block(weights, block, n_ff)


def lfm2_window(writer, weights, n_vocab, arch):
    """LFM2 with a sliding window on its attention layers: two caches (one of them with no
    layers, as every attention layer is windowed) and then the recurrent state."""
    writer.add_uint32(f"{arch}.attention.sliding_window", 128)
    lfm2(writer, weights, n_vocab, arch)


def llama4(writer, weights, n_vocab, arch):
    """Llama 4 without experts (MobileLLM's shape): chunked attention, which llama.cpp sets in
    code (chunks of 8,192 on three layers of four) when the file has no sliding-window key."""
    n_head, n_head_kv, n_ff, n_layer = 4, 2, 128, 4
    head_dim = N_EMBD // n_head
    shape_keys(writer, arch, n_ff, n_head, n_head_kv, 1e-5, n_layer, context=32768)
    # Experts must exist, but with no interleave step no layer uses them.
    writer.add_uint32(f"{arch}.expert_count", 2)
    writer.add_uint32(f"{arch}.expert_used_count", 1)
    writer.add_uint32(f"{arch}.expert_feed_forward_length", n_ff)
    writer.add_uint32(f"{arch}.interleave_moe_layer_step", 0)
    embeddings(weights, n_vocab)
    for i in range(n_layer):
        attention_block(weights, f"blk.{i}", n_head_kv, head_dim, n_ff)


# Each kind: its llama.cpp architecture name and what writes its keys and tensors.
KINDS = {
    "mamba": ("mamba", mamba),
    "mamba2": ("mamba2", mamba2),
    "qwen2vl": ("qwen2vl", qwen2vl),
    "deepseek2": ("deepseek2", deepseek2),
    "lfm2": ("lfm2", lfm2),
    "lfm2-window": ("lfm2", lfm2_window),
    "llama4": ("llama4", llama4),
}


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in KINDS:
        sys.exit(f"usage: tiny_model.py {{{','.join(KINDS)}}} OUT.gguf TOKENIZER.gguf")
    kind, out, source = sys.argv[1:]
    arch, write_model = KINDS[kind]
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(f"kvsnap tiny {kind}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    n_vocab = copy_tokenizer(writer, source)
    write_model(writer, Weights(writer), n_vocab, arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
