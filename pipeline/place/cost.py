"""What a model needs, per layer, without loading any weight: the planner's input.

With safetensors present the bytes come from their headers (exact). A folder holding only
config.json is sized from the shapes its architecture implies: mlx-lm's own model class is
built lazily (no array is ever evaluated) and quantized like the config says, so biases,
fused projections, q/k norms and quantization scales are all counted the way mlx-lm lays
them out. The KV cache per token and sliding windows come from the same model's caches.

Mixture-of-experts layers hold every expert but a token reads only the k its router picks:
besides the bytes it holds, each block gets the bytes one token reads (attention, shared
experts, dense MLPs, router, and k/E of the routed experts' bytes). The routed experts are
the tensors of mlx-lm's stacked expert layers (SwitchLinear: `switch_mlp`, gpt-oss `experts`)
or of per-expert module lists (`experts.<i>.`); k is the config's top-k, whatever the
architecture calls it. Memory terms use the held bytes, time terms the read ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import _get_classes

from pipeline.model.load import layer_of, safetensors_header, tensor_index
from pipeline.model.spec import ModelError
from pipeline.place.planner import DEFAULT_MAX_CONTEXT, ModelCost

ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_HEADER_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FLOAT_HEADER_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
DEFAULT_CHECKPOINT_DTYPE = "float16"  # what most published checkpoints hold


def default_max_context(config: dict) -> int:
    """The model's context length, or DEFAULT_MAX_CONTEXT when the config does not say."""
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_CONTEXT


def config_dtype(config: dict) -> str:
    name = str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", "")
    return name if name in ELEMENT_BYTES else DEFAULT_CHECKPOINT_DTYPE


def _lazy_model(config: dict) -> nn.Module:
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:  # mlx-lm has no module for this model_type
        raise ModelError(f"cannot size model_type '{config['model_type']}': {e}") from None
    return model_class(args_class.from_dict(config))  # parameters stay unevaluated


def _args(model: nn.Module):
    """The text model's args: a multimodal wrapper (Gemma 3, Qwen3-VL, ...) nests its text
    model as `language_model`, whose args hold the heads and layer sizes."""
    inner = getattr(model, "language_model", None)
    return inner.args if hasattr(inner, "args") else model.args


def _tied(model: nn.Module, config: dict) -> bool:
    """Whether the embedding doubles as the head: the model's args say, else the config
    (deepseek_v3's and gemma3_text's args lack the field), else whether it has an lm_head."""
    tied = getattr(_args(model), "tie_word_embeddings", None)
    if tied is None:
        tied = config.get("tie_word_embeddings")
    return not hasattr(model, "lm_head") if tied is None else bool(tied)


# What each architecture calls its top-k (hunyuan: one per layer); dbrx's is in ffn_config.
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk",
              "moe_top_k", "moe_k", "top_k_experts")
_EXPERT_LIST = re.compile(r"^(.*\.experts)\.(\d+)\.")  # one module per expert


def _field(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def experts_per_token(args, layer: int) -> int | None:
    """The routed experts a token uses in `layer`, from the model's args; None: not said."""
    for source in (args, _field(args, "text_config"), _field(args, "ffn_config")):
        for key in TOP_K_KEYS:
            k = None if source is None else _field(source, key)
            if isinstance(k, (list, tuple)):
                k = k[layer] if layer < len(k) else None
            if isinstance(k, int) and k > 0:
                return k
    return None


def _token_reads(per_layer: list[int], tensors: list[tuple[str, int, int]], model: nn.Module):
    """(bytes one token reads per block, routed experts per MoE layer, top-k) from the held
    bytes and the blocks' tensors (name, block, bytes). Dense: the held bytes, 0, 0."""
    stacked = {path: m.num_experts for path, m in model.named_modules()
               if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))}
    listed: dict[str, set[str]] = {}
    for name, _, _ in tensors:
        if m := _EXPERT_LIST.match(name):
            listed.setdefault(m.group(1), set()).add(m.group(2))
    reads, experts, top_k = list(per_layer), 0, 0
    for name, i, nbytes in tensors:
        n = stacked.get(name.rpartition(".")[0])
        if n is None and (m := _EXPERT_LIST.match(name)):
            n = len(listed[m.group(1)])
        if not n:
            continue
        k = min(experts_per_token(_args(model), i) or n, n)  # top-k unknown: every expert read
        reads[i] -= nbytes * (n - k) // n
        experts, top_k = experts or n, top_k or k
    return reads, experts, top_k


def _quantize(model: nn.Module, quantization: dict) -> None:
    group_size = quantization.get("group_size", 64)
    own = getattr(model, "quant_predicate", None)

    def predicate(path, module):
        if path in quantization:  # per-layer override written by mlx_lm.convert
            return quantization[path]
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return own(path, module) if own is not None else True

    nn.quantize(model, group_size=group_size, bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def _kv_token_bytes(model: nn.Module, element_bytes: int) -> int:
    """Keys + values one token adds to one layer's cache."""
    args = _args(model)
    heads = args.num_attention_heads
    latent = getattr(args, "kv_lora_rank", None)
    if latent:  # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, ...)
        absorbed = (MultiLinear, QuantizedMultiLinear)  # per-head up-projections of the latent
        if any(isinstance(m, absorbed) for _, m in model.named_modules()):
            return (latent + args.qk_rope_head_dim) * element_bytes  # caches the latent itself
        return heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim) \
            * element_bytes  # expands it to every head's keys and values
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    return 2 * kv_heads * head_dim * element_bytes


def _kv_layout(model: nn.Module, config: dict, element_bytes: int):
    """(bytes per token per layer, sliding window per layer) of the model's KV caches."""
    n = config["num_hidden_layers"]
    caches = model.make_cache() if hasattr(model, "make_cache") else [None] * n
    windows = tuple(c.max_size if isinstance(c, RotatingKVCache) else None for c in caches)
    return (_kv_token_bytes(model, element_bytes),) * n, windows


def config_cost(config: dict, dtype: str | None = None,
                quantization: dict | None | bool = True) -> ModelCost:
    """Per-layer bytes from the architecture's shapes alone.

    dtype: the floating dtype weights are held in (default: the config's, else float16).
    quantization: True = as the config says; a dict {"bits", "group_size"} = as if
    quantized so; None/False = unquantized.
    """
    dtype = dtype or config_dtype(config)
    if quantization is True:
        quantization = config.get("quantization") or config.get("quantization_config")
    model = _lazy_model(config)
    if quantization and "bits" in quantization:
        _quantize(model, quantization)
    tied = _tied(model, config)
    n = config["num_hidden_layers"]
    per_layer, head, matrix, tensors = [0] * n, 0, 0, []
    for name, a in tree_flatten(model.parameters()):
        if tied and name.startswith("lm_head."):
            continue  # the embedding doubles as the head
        size = a.size * ELEMENT_BYTES[dtype] if mx.issubdtype(a.dtype, mx.floating) else a.nbytes
        i = layer_of(name)
        if i is None:
            head += size
            matrix += size if _is_head_matrix(name, tied) else 0
        else:
            per_layer[i] += size
            tensors.append((name, i, size))
    return _cost(model, config, per_layer, tensors, head, matrix, tied, dtype, quantization,
                 "config.json shapes")


def _cost(model, config: dict, per_layer: list[int], tensors: list, head: int, matrix: int,
          tied: bool, dtype: str, quantization: dict | None, source: str) -> ModelCost:
    """The ModelCost of sized tensors: KV layout and per-token reads from the model, the held
    dtype, a description naming the bits (quantized) or the dtype, and where sizes came from."""
    kv, windows = _kv_layout(model, config, ELEMENT_BYTES[dtype])
    reads, experts, top_k = _token_reads(per_layer, tensors, model)
    q = quantization or {}
    what = f"{q['bits']}-bit" if "bits" in q else dtype
    element = ELEMENT_BYTES[dtype]  # a quantized weight: its bits and a share of scale and bias
    per_param = q["bits"] / 8 + 2 * element / q.get("group_size", 64) if "bits" in q else element
    return ModelCost(tuple(per_layer), head, kv, windows,
                     hidden_bytes=config["hidden_size"] * ELEMENT_BYTES[dtype], dtype=dtype,
                     description=f"{_summary(config, tied, experts, top_k)}, {what} "
                                 f"(from {source})",
                     head_matrix_bytes=matrix, vocab=_vocab(config),
                     layer_read_bytes=tuple(reads), experts=experts, experts_per_token=top_k,
                     bytes_per_param=per_param)


def _is_head_matrix(name: str, tied: bool) -> bool:
    """Whether a tensor is part of the head's matrix (weight, quantization scales/biases)."""
    return name.startswith("model.embed_tokens." if tied else "lm_head.")


def _vocab(config: dict) -> int:
    v = config.get("vocab_size")
    return v if isinstance(v, int) and v > 0 else 0


def _summary(config: dict, tied: bool, experts: int, top_k: int) -> str:
    moe = f", {top_k} of {experts} routed experts per token" if experts else ""
    return (f"{config['model_type']} {config['num_hidden_layers']} layers, hidden "
            f"{config['hidden_size']}, vocab {config.get('vocab_size')}, "
            f"{'tied' if tied else 'separate'} head{moe}")


def _checkpoint_cost(path: Path, config: dict, dtype: str | None) -> ModelCost | None:
    """Per-layer bytes from the safetensors headers; None when the weights are not here."""
    try:
        index = tensor_index(path)
    except ModelError:
        if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
            raise  # weights that are there but unreadable: say so
        return None
    n = config["num_hidden_layers"]
    per_layer, head = index.layer_bytes(n)
    headers = {}
    for f in sorted(set(index.file_of.values())):
        if (path / f).exists():
            headers.update(safetensors_header(path / f))
    if set(index.file_of) - set(headers):
        return None  # shards not downloaded yet: sizes unknown
    held = config_dtype(config)
    for name in ("model.embed_tokens.scales", "model.embed_tokens.weight"):
        if name in headers and headers[name]["dtype"] in _HEADER_DTYPES:
            held = _HEADER_DTYPES[headers[name]["dtype"]]
            break
    model = _lazy_model(config)
    tied = _tied(model, config)
    matrix, tensors = 0, []
    for name, info in headers.items():
        nbytes = index.nbytes[name]
        if dtype is not None and info["dtype"] in _FLOAT_HEADER_BYTES:
            # the runtime casts floating tensors (e.g. to float32 on CPU)
            nbytes = nbytes // _FLOAT_HEADER_BYTES[info["dtype"]] * ELEMENT_BYTES[dtype]
        i = layer_of(name)
        if dtype is not None and i is None:
            head += nbytes - index.nbytes[name]
        elif dtype is not None and i < n:
            per_layer[i] += nbytes - index.nbytes[name]
        if i is None and _is_head_matrix(name, tied):
            matrix += nbytes
        if i is not None and i < n:
            tensors.append((name, i, nbytes))
    if dtype is not None:
        held = dtype
    return _cost(model, config, per_layer, tensors, head, matrix, tied, held,
                 config.get("quantization"), "safetensors headers")


def model_cost(path: Path, config: dict, dtype: str | None = None) -> ModelCost:
    """The model's cost from its weights' headers, or from config.json when there are none.

    dtype: what the runtime casts floating weights to (its --dtype), None = as stored.
    """
    return _checkpoint_cost(path, config, dtype) or config_cost(config, dtype)


def quantized_alternatives(config: dict, dtype: str | None = None) -> list[tuple[str, ModelCost]]:
    """Smaller variants to suggest when a model does not fit: 8-bit and 4-bit, as
    mlx_lm.convert -q would make them (group size 64). dtype: of scales and the rest."""
    q = config.get("quantization") or {}
    bits_now = q.get("bits", 16)
    return [(f"{'an' if bits == 8 else 'a'} {bits}-bit quantized variant",
             config_cost(config, dtype, {"bits": bits, "group_size": 64}))
            for bits in (8, 4) if bits < bits_now]
