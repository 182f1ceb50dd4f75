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
from mlx_lm.utils import _get_classes, dequantize_model, infer_quant_config

from pipeline.model.tensor import VocabShard, shard_blocks
from pipeline.model.shell import (SPECIAL_SHELLS, Layout, Shell, UnsupportedModel, cache_template,
                                  module_at, probe, refusal)
from pipeline.model.spec import META_PATTERNS, ModelError, hub_snapshot
from pipeline.model.stage import Stage

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# A multimodal checkpoint's other towers have layers of their own; mlx-lm drops them.
_NOT_TEXT = re.compile(r"^(?:model\.)?(?:vision_tower|vision_model|visual|audio_tower|"
                       r"multi_modal_projector|mm_projector)\.")


def layer_of(name: str) -> int | None:
    """Transformer block index of a tensor name, None for embedding/norm/head tensors (and
    for a multimodal checkpoint's vision or audio tower, which rank 0 reads and drops)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m and not _NOT_TEXT.match(name) else None


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
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal: the text model's sizes, for planning
        config = {**{k: v for k, v in text.items() if k != "model_type"}, **config}
    layers = check_supported(config)
    if "num_hidden_layers" not in config:
        config["num_hidden_layers"] = layers
    if config["num_hidden_layers"] != layers:
        raise ModelError(f"{file} says num_hidden_layers {config['num_hidden_layers']!r}, "
                         f"but mlx-lm's {config['model_type']} builds {layers} blocks")
    return config


def build_model(config: dict) -> nn.Module:
    """mlx-lm's model for this config, its weights lazy (nothing is computed or read)."""
    model_type = config["model_type"]
    try:
        model_class, args_class = _get_classes(config)
    except ValueError:
        raise UnsupportedModel(f"unsupported model_type '{model_type}': mlx-lm has no such "
                               f"architecture") from None
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
        raise ModelError(f"config.json does not describe an mlx-lm {model_type} model "
                         f"({type(e).__name__}: {e})") from None


_checked: dict[str, int] = {}


def check_supported(config: dict) -> int:
    """Refuse (UnsupportedModel, saying why) a model whose forward a share of its blocks
    cannot run; else return its number of blocks. Builds the model lazily and probes it."""
    if config["model_type"] in SPECIAL_SHELLS:
        raise refusal(config["model_type"], SPECIAL_SHELLS[config["model_type"]])
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _checked:
        model = build_model(config)
        layout = probe(model, config["model_type"])
        _checked[key] = len(module_at(model, layout.inner)["layers"])
    return _checked[key]


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
              head_share: bool = False, head_parts: tuple[str, ...] = ()) -> list[str]:
        """Tensors of these layers (plus embedding, norm and head with_head; plus the norm
        and the head's matrix with head_share: the last rank's share of the head, under the
        prefixes head_parts, by default the usual names)."""
        start, end = layer_range
        return sorted(
            n for n in self.file_of
            if (i := layer_of(n)) is None and (
                with_head or head_share and _head_part(n, head_parts))
            or i is not None and start <= i < end
        )


_HEAD_PART = re.compile(r"^(?:language_model\.)?(?:model\.norm|lm_head|model\.embed_tokens)\.")


def _head_part(name: str, prefixes: tuple[str, ...] = ()) -> bool:
    """A tensor the last rank needs for its share of the head (either kind of head: the
    one the model does not use is not loaded)."""
    if prefixes:
        return name.startswith(tuple(f"{p}." for p in prefixes))
    return bool(_HEAD_PART.match(name))


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
DTYPE_NAMES = ("float32", "float16", "bfloat16", KEEP_DTYPE)  # what --dtype takes


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
    """Quantize the modules the checkpoint holds quantized, as mlx-lm's load_model does
    (per-path settings from the config, else read off the stored shapes)."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q or "bits" not in q:
        return

    def predicate(path, module):
        if path in q:
            return q[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=q.get("group_size", 64), bits=q["bits"],
                mode=q.get("mode", "affine"), class_predicate=predicate)


def _read_weights(path: Path, index: TensorIndex, names: list[str]) -> dict:
    """The named tensors, lazily: data is read from the files only when evaluated."""
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(index.file_of[n], []).append(n)
    weights = {}
    for f, wanted in by_file.items():
        safetensors_header(path / f)  # names a truncated or corrupted file before loading it
        try:
            tensors = mx.load(str(path / f))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelError(f"cannot read weights file {path / f} ({e}): re-download it") from None
        missing = [n for n in wanted if n not in tensors]
        if missing:
            raise ModelError(f"{path / f} lacks tensor {missing[0]} named in the index")
        weights.update((n, tensors[n]) for n in wanted)
    return weights


def _head_paths(layout: Layout) -> tuple[str, ...]:
    """Checkpoint prefixes of the final norm and of either kind of head."""
    embed = f"{layout.inner}.{layout.embed}" if layout.inner else layout.embed
    return tuple(p for p in (layout.norm, layout.head, embed) if p)


def _other_parts(model: nn.Module, layout: Layout) -> dict:
    """Prefix -> module (or array) of everything outside the blocks: embedding, final norm,
    head and whatever else the model keeps beside its `layers`."""
    parts = layout.inner.split(".") if layout.inner else []
    out, node, prefix = {}, model, ""
    for depth in range(len(parts) + 1):
        skip = parts[depth] if depth < len(parts) else "layers"
        for k, v in node.items():
            if k != skip and isinstance(v, (nn.Module, mx.array)):
                out[f"{prefix}.{k}" if prefix else k] = v
        if depth < len(parts):
            node, prefix = node[skip], f"{prefix}.{skip}" if prefix else skip
    return out


def load_stage(path: Path, config: dict, layer_range: tuple[int, int], with_head: bool,
               dtype: str | None = None, repo: str | None = None,
               dequantize: bool = False, head_share_rows: int = 0, group=None) -> Stage:
    """Build the model lazily with mlx-lm's classes and materialize only this rank's share.

    head_share_rows > 0 (the last rank): also the final norm and the head's first rows.
    group: the stage's tensor-parallel group (an mx.distributed group of 2 or more ranks):
    this rank's part of every block, and with the head, its vocabulary rows (model/tensor.py)."""
    model = build_model(config)
    layout = probe(model, config["model_type"])
    index = tensor_index(path, repo, sizes=False)
    names = index.share(layer_range, with_head, head_share=head_share_rows > 0,
                        head_parts=_head_paths(layout))
    if repo is not None:
        path = hub_snapshot(repo, [*META_PATTERNS, *{index.file_of[n] for n in names}])
    weights = _read_weights(path, index, names)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _quantize_like_checkpoint(model, config, weights)
    layout = probe(model, config["model_type"])  # after sanitize: the head it really uses

    start, end = layer_range
    modules = {f"{layout.layers}.{i}": module_at(model, layout.layers)[i]
               for i in range(start, end)}
    if with_head:
        modules.update(_other_parts(model, layout))
    elif head_share_rows > 0:
        modules.update((p, module_at(model, p)) for p in (layout.norm, layout.head) if p)
    held = _flatten(modules)
    # Checkpoint names are the model's parameter names (after sanitize).
    missing = sorted(set(held) - set(weights))
    if missing:
        raise ModelError(f"checkpoint in '{path}' lacks {len(missing)} tensors, e.g. {missing[0]}")
    model.load_weights([(n, w) for n, w in weights.items() if n in held], strict=False)
    # Whole-model transforms are lazy: only this rank's modules are ever computed.
    if dequantize:
        model = dequantize_model(model)
    if dtype is not None:
        _cast_floats(model, DTYPES[dtype])
    modules = {p: module_at(model, p) for p in modules}  # dequantized modules are new ones
    vocab = None
    if group is not None:
        shard_blocks(model, layout, layer_range, group)
        if with_head:
            embed_path = f"{layout.inner}.{layout.embed}".lstrip(".")
            vocab = VocabShard(module_at(model, embed_path),
                               None if layout.tied else module_at(model, layout.head),
                               int(module_at(model, embed_path).weight.shape[0]), group)
    owner = module_at(model, layout.inner.rpartition(".")[0])
    stage = Stage(args=getattr(owner, "args", getattr(model, "args", None)),
                  model_type=config["model_type"], layer_range=layer_range,
                  layers=[modules[f"{layout.layers}.{i}"] for i in range(start, end)],
                  modules=modules)
    if with_head:
        stage.embed_tokens = module_at(model, f"{layout.inner}.{layout.embed}".lstrip("."))
        stage.lm_head = None if layout.tied else module_at(model, layout.head)
    if with_head or head_share_rows > 0:
        stage.norm = module_at(model, layout.norm) if layout.norm else None
    if head_share_rows > 0 and not with_head:
        stage.head_share, stage.head_share_name = module_at(model, layout.head), layout.head
        _keep_rows(stage.head_share, head_share_rows)
    if vocab is not None:
        stage.vocab, stage.tp = vocab, group.size()
    elif group is not None:
        stage.tp = group.size()
    held = held_parameters(stage)
    for i in range(0, len(held), 64):  # a part at a time: a split reads whole tensors first
        mx.eval(list(held.values())[i : i + 64])
    stage.loaded_names = sorted(held)

    template = cache_template(model, len(module_at(model, layout.layers)))
    stage.cache_factory = lambda: [copy.deepcopy(c) for c in template]
    stage.min_window = min((c.max_size for c in _all_caches(template)
                            if isinstance(c, RotatingKVCache)), default=None)
    stage.rewindable = all(c.is_trimmable() for c in template)
    stage.shell = Shell(model, layout, layer_range, template)
    if vocab is not None:
        stage.shell.replace_embedding(vocab)
    return stage


def _all_caches(caches: list) -> list:
    """Caches, with those inside a CacheList."""
    return [x for c in caches for x in (_all_caches(list(c.caches)) if hasattr(c, "caches")
                                        else [c])]


def _keep_rows(module: nn.Module, rows: int) -> None:
    """Keep the first `rows` rows of every parameter, as arrays of their own (a plain slice
    would keep the whole loaded tensor alive behind it)."""
    def first_rows(a):
        return a[:rows] * mx.array(1, a.dtype)  # x * 1 == x exactly, in a new buffer

    module.update(tree_map(first_rows, module.parameters()))


def _flatten(modules: dict) -> dict[str, mx.array]:
    out = {}
    for prefix, m in modules.items():
        if isinstance(m, mx.array):
            out[prefix] = m
        else:
            out.update((f"{prefix}.{n}", a) for n, a in tree_flatten(m.parameters()))
    return out


def held_parameters(stage: Stage) -> dict[str, mx.array]:
    """This rank's parameters by checkpoint name."""
    return _flatten(stage.modules)


def _cast_floats(model: nn.Module, dtype) -> None:
    """Every floating parameter to `dtype`, quantization scales and biases included (a
    quantized product then runs in `dtype`, like the rest of the stage)."""
    def cast(a):
        return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a

    model.update(tree_map(cast, model.parameters()))


def resident_bytes(stage: Stage) -> int:
    return sum(a.nbytes for a in held_parameters(stage).values())
