"""Find a model and materialize only this rank's tensors.

A model is a local mlx-lm folder (config.json + safetensors, single file or index), a
llama-architecture .gguf file (imported once into a cached folder), a Hugging Face repo id
(each rank fetches only the files that hold its tensors), or nothing: the embedded
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.utils import _get_classes, dequantize_model

from pipeline.model.spec import META_PATTERNS, ModelError, hub_snapshot
from pipeline.model.stage import Stage, check_supported




DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Transformer block index of a tensor name, None for embedding/norm/head tensors."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"no config.json in '{path}': not an mlx-lm / Hugging Face model folder")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is not valid JSON ({e}): re-download or fix the file") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{file} has no model_type: not a transformer config")
    check_supported(config["model_type"])
    if not isinstance(config.get("num_hidden_layers"), int):
        raise ModelError(f"{file} has no integer num_hidden_layers")
    return config


def safetensors_header(file: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size (a truncated
    or corrupted file is named here, before any rank loads it)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            size = file.stat().st_size
            if n > size - 8:  # a corrupted length would make us read (or allocate) too much
                raise ValueError(f"header length {n} exceeds the file's {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        end = 8 + n + max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        if end > size:
            raise ValueError(f"truncated: {size} bytes, its header describes {end}")
    except (OSError, struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError,
            IndexError) as e:
        raise ModelError(f"{file} is not a readable safetensors file ({e}): re-download it") from None
    return header


@dataclass
class TensorIndex:
    """Where every tensor of a checkpoint lives and how many bytes it takes."""

    file_of: dict[str, str]
    nbytes: dict[str, int]

    def layer_bytes(self, num_layers: int) -> tuple[list[int], int]:
        """Bytes per transformer block, and bytes of everything else (rank 0's share)."""
        per_layer, other = [0] * num_layers, 0
        for name, size in self.nbytes.items():
            i = layer_of(name)
            if i is None:
                other += size
            elif i < num_layers:
                per_layer[i] += size
        return per_layer, other

    def share(self, layer_range: tuple[int, int], with_head: bool,
              head_share: bool = False) -> list[str]:
        """Tensors of these layers (plus embedding, norm and head with_head; plus the norm
        and the head's matrix with head_share: the last rank's share of the head)."""
        start, end = layer_range
        return sorted(
            n for n in self.file_of
            if (i := layer_of(n)) is None and (with_head or head_share and _head_part(n))
            or i is not None and start <= i < end
        )


def _head_part(name: str) -> bool:
    """A tensor the last rank needs for its share of the head (either kind of head: the
    one the model does not use is not loaded)."""
    return name.startswith(("model.norm.", "lm_head.", "model.embed_tokens."))


def tensor_index(path: Path, repo: str | None = None, sizes: bool = True) -> TensorIndex:
    """Read the safetensors index (or headers) without loading any tensor data.

    sizes=False: leave nbytes at 0 and read no shard's header (a rank that holds only its
    own shards needs just the index)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            file_of = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"{index_file} is not a valid safetensors index ({e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files and repo is not None:  # single-file repo: its one file is everyone's
            path = hub_snapshot(repo, [*META_PATTERNS, "*.safetensors"])
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"no .safetensors weights in '{path}'")
        file_of = {n: f for f in files for n in safetensors_header(path / f)}
    nbytes = {}
    for f in sorted(set(file_of.values())) if sizes else []:
        local = path / f
        if not local.exists():
            # The index alone does not say sizes; a missing shard is fetched (or sent by
            # rank 0) before it is loaded, and loading reports one that is still missing.
            continue
        for n, info in safetensors_header(local).items():
            s, e = info["data_offsets"]
            nbytes[n] = e - s
    for n in file_of:
        nbytes.setdefault(n, 0)
    return TensorIndex(file_of, nbytes)


KEEP_DTYPE = "checkpoint"  # --dtype checkpoint: every tensor as stored, as mlx-lm runs it


def default_dtype() -> str | None:
    """float32 on a CPU, the checkpoint's dtypes (None) on a GPU.

    On a CPU float32 is the fast dtype (measured, one core: bf16 products of 16 rows 6x
    slower, 4-bit ones with bf16 scales 8x, with f16 scales 30x and more). It also rounds
    differently from a 16-bit checkpoint's own dtype, so its greedy tokens can differ from
    mlx-lm's; KEEP_DTYPE keeps them."""
    return "float32" if mx.default_device() == mx.cpu else None


def resolve_dtype(flag: str | None) -> str | None:
    """What a --dtype flag casts floating weights to: its dtype, KEEP_DTYPE -> None (nothing
    is cast), no flag -> default_dtype()."""
    if flag == KEEP_DTYPE:
        return None
    return flag or default_dtype()


def _quantize_like_checkpoint(model: nn.Module, config: dict, weights: dict) -> None:
    q = config.get("quantization") or config.get("quantization_config")
    if not q or "bits" not in q:
        return

    def predicate(path, module):
        if path in q:
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=q.get("group_size", 64), bits=q["bits"],
                mode=q.get("mode", "affine"), class_predicate=predicate)


def load_stage(path: Path, config: dict, layer_range: tuple[int, int], with_head: bool,
               dtype: str | None = None, repo: str | None = None,
               dequantize: bool = False, head_share_rows: int = 0) -> Stage:
    """Build the model lazily with mlx-lm's classes and materialize only this rank's share.

    head_share_rows > 0 (the last rank): also the final norm and the head's first rows."""
    index = tensor_index(path, repo, sizes=False)
    names = index.share(layer_range, with_head, head_share=head_share_rows > 0)
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(index.file_of[n], []).append(n)
    if repo is not None:
        path = hub_snapshot(repo, [*META_PATTERNS, *by_file])
    weights = {}
    for f, wanted in by_file.items():
        safetensors_header(path / f)  # names a truncated or corrupted file before loading it
        try:
            tensors = mx.load(str(path / f))  # lazy: data is read only when evaluated
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelError(f"cannot read weights file {path / f} ({e}): re-download it") from None
        missing = [n for n in wanted if n not in tensors]
        if missing:
            raise ModelError(f"{path / f} lacks tensor {missing[0]} named in the index")
        weights.update((n, tensors[n]) for n in wanted)

    model_class, args_class = _get_classes(config)
    args = args_class.from_dict(config)
    model = model_class(args)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _quantize_like_checkpoint(model, config, weights)

    inner = model.model
    start, end = layer_range
    stage = Stage(
        args=args,
        model_type=config["model_type"],
        layer_range=layer_range,
        layers=inner.layers[start:end],
        cache_factory=getattr(model, "make_cache", None),
    )
    if with_head:
        stage.embed_tokens = inner.embed_tokens
        stage.norm = inner.norm
        stage.lm_head = model.get("lm_head") if "lm_head" in model else None
    elif head_share_rows > 0:
        stage.norm = inner.norm
        separate = "lm_head" in model
        stage.head_share = model["lm_head"] if separate else inner.embed_tokens
        stage.head_share_name = "lm_head" if separate else "model.embed_tokens"
    held = held_parameters(stage)

    # Checkpoint names are the model's parameter names (after sanitize).
    missing = sorted(set(held) - set(weights))
    if missing:
        raise ModelError(f"checkpoint in '{path}' lacks {len(missing)} tensors, e.g. {missing[0]}")
    model.load_weights([(n, w) for n, w in weights.items() if n in held], strict=False)
    if dequantize:
        _dequantize(stage)
    if dtype is not None:
        target = DTYPES[dtype]
        _cast_floats(stage, target)
    if stage.head_share is not None:
        _keep_rows(stage.head_share, head_share_rows)
    mx.eval(list(held_parameters(stage).values()))
    stage.cache_factory = _bind_cache_factory(model)
    if stage.cache_factory is not None:
        windows = [c.max_size for c in stage.cache_factory() if isinstance(c, RotatingKVCache)]
        stage.min_window = min(windows, default=None)
    stage.loaded_names = sorted(held)
    return stage


def _module_tree(stage: Stage) -> dict:
    start, _ = stage.layer_range
    tree = {f"model.layers.{start + i}": layer for i, layer in enumerate(stage.layers)}
    if stage.embed_tokens is not None:
        tree["model.embed_tokens"] = stage.embed_tokens
        tree["model.norm"] = stage.norm
    if stage.lm_head is not None:
        tree["lm_head"] = stage.lm_head
    if stage.head_share is not None:
        tree["model.norm"] = stage.norm
        tree[stage.head_share_name] = stage.head_share
    return tree


def _keep_rows(module: nn.Module, rows: int) -> None:
    """Keep the first `rows` rows of every parameter, as arrays of their own (a plain slice
    would keep the whole loaded tensor alive behind it)."""
    def first_rows(a):
        return a[:rows] * mx.array(1, a.dtype)  # x * 1 == x exactly, in a new buffer

    module.update(tree_map(first_rows, module.parameters()))


def held_parameters(stage: Stage) -> dict[str, mx.array]:
    out = {}
    for prefix, module in _module_tree(stage).items():
        for n, a in tree_flatten(module.parameters()):
            out[f"{prefix}.{n}"] = a
    return out


def _dequantize(stage: Stage) -> None:
    """Quantized layers back to dense ones (mlx-lm's dequantize_model on this rank's modules):
    on a CPU, quantized matmuls are several times slower than float32 ones."""
    holder = nn.Module()
    holder.layers = stage.layers
    for name in ("embed_tokens", "lm_head", "head_share"):
        if getattr(stage, name) is not None:
            setattr(holder, name, getattr(stage, name))
    dequantize_model(holder)
    stage.layers = holder.layers
    for name in ("embed_tokens", "lm_head", "head_share"):
        if name in holder:
            setattr(stage, name, holder[name])


def _cast_floats(stage: Stage, dtype) -> None:
    """Every floating parameter to `dtype`, quantization scales and biases included (a
    quantized product then runs in `dtype`, like the rest of the stage)."""
    def cast(a):
        return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a

    for module in _module_tree(stage).values():
        module.update(tree_map(cast, module.parameters()))


def _bind_cache_factory(model: nn.Module):
    """Cache layout for the whole model without keeping the model (and its lazy weights)."""
    if not hasattr(model, "make_cache"):
        return None
    kinds = model.make_cache()  # cheap: empty cache objects
    return lambda: [copy.deepcopy(c) for c in kinds]


def resident_bytes(stage: Stage) -> int:
    return sum(a.nbytes for a in held_parameters(stage).values())
