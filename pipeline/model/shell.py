"""mlx-lm's own forward, run on one rank's share of the blocks.

Every mlx-lm text model is an outer model (with the head) around an inner one, its "shell": it
embeds the tokens, builds each block's mask from the caches (causal, sliding window, linear
attention's mask, per layer type), runs the blocks of its `layers` list in order and applies
the final norm. A Shell keeps that code and replaces each entry of `layers` with a _Slot:
this rank's slots run their blocks, the others pass the hidden state through. The hidden
state a rank receives is fed in at its first block and taken out after its last; what the
shell does to its own input (the embedding, gemma's scale) or after the blocks (the norm)
stays unused and, MLX being lazy, is never computed.

Whether a model fits that mould is decided by running its forward once on pass-through
blocks (probe): blocks called once each, in order, each with its own cache, the hidden state
passed unchanged from block to block, then at most a norm, then the head. A model that does
not is refused with what it does differently.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache


class UnsupportedModel(ValueError):
    pass


# Shells the probe cannot see through, with why (the probe sees calls, not in-place edits).
SPECIAL_SHELLS = {
    "gemma3n": "its blocks share keys/values across layers and take per-layer inputs "
               "computed from the tokens (AltUp), so a rank cannot start from a hidden state",
    "gemma4_text": "its blocks take per-layer inputs computed from the tokens and share "
                   "keys/values across layers, so a rank cannot start from a hidden state",
}


@dataclass
class Layout:
    """Where the parts of a model are, as dotted paths from the outer model."""

    inner: str  # the module whose `layers` list holds the blocks, e.g. "model"
    embed: str  # attribute of the inner model holding the embedding, e.g. "embed_tokens"
    norm: str | None  # the final norm, e.g. "model.norm" (None: the model has none)
    head: str  # the head, e.g. "lm_head", or "model.embed_tokens" when tied
    tied: bool  # the head is the embedding's as_linear

    @property
    def layers(self) -> str:
        return f"{self.inner}.layers" if self.inner else "layers"


def module_at(model: nn.Module, path: str):
    for part in path.split(".") if path else []:
        model = model[int(part)] if isinstance(model, list) else model[part]
    return model


def _find_inner(model: nn.Module, path: str = "") -> str | None:
    """Path of the first module (breadth first) holding a `layers` list of modules."""
    queue = [(path, model)]
    while queue:
        here, module = queue.pop(0)
        layers = module.get("layers")
        if isinstance(layers, list) and layers and all(isinstance(b, nn.Module) for b in layers):
            return here
        queue += [(f"{here}.{k}" if here else k, v) for k, v in module.items()
                  if isinstance(v, nn.Module)]
    return None


def _block_list_name(model: nn.Module) -> str | None:
    """The name of a list of modules anywhere in the model (the blocks, when not `layers`)."""
    for _, module in model.named_modules():
        for k, v in module.items():
            if isinstance(v, list) and len(v) > 1 and all(isinstance(b, nn.Module) for b in v):
                return k
    return None


def cache_template(model: nn.Module, num_layers: int) -> list:
    """The model's caches for every layer, empty (mlx-lm's make_cache, else KVCache each)."""
    if hasattr(model, "make_cache"):
        return model.make_cache()
    return [KVCache() for _ in range(num_layers)]


def cache_kind(cache) -> tuple:
    """What makes two empty caches alike: class and settings (window size, state count...)."""
    if cache is None:
        return (None,)
    fields = []
    for k, v in sorted(vars(cache).items()):
        if isinstance(v, (int, float, str, bool)) or v is None:
            fields.append((k, v))
        elif isinstance(v, (list, tuple)):
            fields.append((k, tuple(cache_kind(c) if hasattr(c, "__dict__") else type(c).__name__
                                    for c in v)))
    return (type(cache).__name__, tuple(fields))


class _Recorder:
    """Stands in for a module during the probe: calls it and notes (name, input, output)."""

    def __init__(self, name: str, module, calls: list):
        self._name, self._module, self._calls = name, module, calls

    def __call__(self, *args, **kwargs):
        out = self._module(*args, **kwargs)
        self._calls.append((self._name, args[0] if args else None, out))
        return out

    def __getattr__(self, attr):
        value = getattr(self._module, attr)
        if not inspect.ismethod(value):
            return value

        def method(*args, **kwargs):
            out = value(*args, **kwargs)
            self._calls.append((f"{self._name}.{attr}", args[0] if args else None, out))
            return out

        return method


class _ProbeSlot:
    def __init__(self, index: int, block, calls: list):
        self._index, self._block, self._calls = index, block, calls

    def __call__(self, x, *args, **kwargs):
        self._calls.append((self._index, x, (args, kwargs)))
        return x

    def __getattr__(self, attr):  # the shell may read a block's settings (is_linear, ...)
        return getattr(self._block, attr)


def _swap(owner: nn.Module, key: str, value) -> object:
    old = owner[key]
    owner[key] = value
    return old


def refusal(model_type: str, why: str) -> UnsupportedModel:
    return UnsupportedModel(f"pipeline cannot run model_type '{model_type}': {why}")


def probe(model: nn.Module, model_type: str) -> Layout:
    """Run the model's forward once on pass-through blocks and read its layout off the calls
    it makes; UnsupportedModel says what a model does that a share of its blocks cannot."""
    def refuse(why: str) -> UnsupportedModel:
        return refusal(model_type, why)

    if model_type in SPECIAL_SHELLS:
        raise refuse(SPECIAL_SHELLS[model_type])
    inner_path = _find_inner(model)
    if inner_path is None:
        name = _block_list_name(model)
        raise refuse(f"its blocks are in `{name}`, not a `layers` list (ranks are given "
                     f"tensors by their `layers.N.` names)" if name else
                     "it has no list of blocks (a recurrent or single-block design)")
    inner = module_at(model, inner_path)
    if not callable(inner):
        raise refuse("its `layers` list sits in a module that has no forward of its own")
    if "cache" not in inspect.signature(inner.__call__).parameters:
        raise refuse("its inner model's forward takes no `cache`")
    blocks = list(inner["layers"])
    template = cache_template(model, len(blocks))
    if len(template) != len(blocks):
        raise refuse(f"it makes {len(template)} caches for {len(blocks)} blocks (its "
                     f"blocks run more than once, or keep caches beside the blocks)")

    calls, tokens, out = _record_forward(model, inner_path, blocks, template, refuse)
    names = {f"{prefix}.{key}" if prefix else key
             for prefix, owner in _owners(model, inner_path) for key in owner}
    return _read_layout(calls, tokens, out, inner_path, names, template, refuse)


def _owners(model: nn.Module, inner_path: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of the outer model and of each module down to the inner one."""
    parts = inner_path.split(".") if inner_path else []
    return [("", model)] + [(".".join(parts[: i + 1]), module_at(model, ".".join(parts[: i + 1])))
                            for i in range(len(parts))]


def _record_forward(model: nn.Module, inner_path: str, blocks: list, template: list, refuse):
    """Run the model's forward on 3 tokens with pass-through blocks and every other module
    on the way (embedding, norm, head, ...) recording its calls; then put them all back.
    Returns (calls, tokens, output): a call is (name or block index, input, output or the
    block's other arguments)."""
    calls: list = []
    swapped = []  # (owner, key, original) to put back
    parts = inner_path.split(".") if inner_path else []
    for depth, (prefix, owner) in enumerate(_owners(model, inner_path)):
        on_path = parts[depth] if depth < len(parts) else "layers"
        for key in [k for k, v in owner.items() if isinstance(v, nn.Module) and k != on_path]:
            name = f"{prefix}.{key}" if prefix else key
            swapped.append((owner, key, _swap(owner, key, _Recorder(name, owner[key], calls))))
    inner = module_at(model, inner_path)
    slots = [_ProbeSlot(i, b, calls) for i, b in enumerate(blocks)]
    swapped.append((inner, "layers", _swap(inner, "layers", slots)))
    tokens = mx.zeros((1, 3), mx.int32)
    try:
        return calls, tokens, model(tokens, cache=template)
    except Exception as e:  # the reason is the model's own error, named in the refusal
        raise refuse(f"its forward fails when blocks pass the hidden state through "
                     f"({type(e).__name__}: {e})") from None
    finally:
        for owner, key, original in reversed(swapped):
            owner[key] = original


def _read_layout(calls: list, tokens, out, inner_path: str, modules: set, template: list,
                 refuse) -> Layout:
    """The layout the recorded calls show, or the refusal for what they show instead.
    modules: the names of the modules held by the outer model and those down to the inner."""
    steps = [c for c in calls if isinstance(c[0], int)]
    if [c[0] for c in steps] != list(range(len(template))):
        raise refuse("its forward does not run each block once, in order")
    for i, (_, x, (args, kwargs)) in enumerate(steps):
        given = [a for a in (*args, *kwargs.values()) if any(a is c for c in template)]
        if not any(a is template[i] for a in given):
            raise refuse("its blocks share caches across layers" if given else
                         "its blocks do not get their caches from the model's forward")
        if i and x is not steps[i - 1][1]:
            raise refuse("its forward changes the hidden state between blocks "
                         "(its layers share state across blocks)")
    embeds = [c[0] for c in calls if not isinstance(c[0], int) and c[1] is tokens]
    if not embeds or embeds[0] not in modules or embeds[0].rpartition(".")[0] != inner_path:
        raise refuse("it does not embed the tokens with a module of its inner model")
    embed = embeds[0]
    # After the last block: at most a final norm, then the head, each on the previous output.
    h, tail = steps[-1][1], []
    for name, x, y in calls:
        if not isinstance(name, int) and x is h:
            tail.append(name)
            h = y
    if h is not out or not 1 <= len(tail) <= 2:
        raise refuse("after its blocks it does more than a final norm and a head module: "
                     "its logits are scaled, soft-capped or computed from a weight directly")
    head, tied = tail[-1], tail[-1] == f"{embed}.as_linear"
    if not tied and head not in modules or len(tail) == 2 and tail[0] not in modules:
        raise refuse(f"its head or final norm is not a module call ({', '.join(tail)})")
    return Layout(inner=inner_path, embed=embed.rpartition(".")[2],
                  norm=tail[0] if len(tail) == 2 else None,
                  head=embed if tied else head, tied=tied)


class _Slot:
    """Entry `index` of the inner model's `layers` while a Shell runs it."""

    def __init__(self, shell: "Shell", index: int, block):
        self._shell, self._index, self._block = shell, index, block

    def __call__(self, x, *args, **kwargs):
        return self._shell._step(self._index, self._block, x, args, kwargs)

    def __getattr__(self, attr):  # the shell may read a block's settings (is_linear, ...)
        return getattr(self._block, attr)


class _Feed:
    """Stands in for the inner model's embedding: the real one when the stage embeds
    tokens, else a copy of the hidden state being fed in (its shape and dtype are what the
    shell builds masks from; a copy, because a shell may scale its embedding in place)."""

    def __init__(self, shell: "Shell", embedding):
        self._shell, self._embedding = shell, embedding

    def __call__(self, tokens):
        if self._shell._feeding is None:
            return self._embedding(tokens)
        return mx.array(self._shell._feeding)

    def __getattr__(self, attr):
        return getattr(self._embedding, attr)


class Shell:
    """The inner model of `model` running blocks [start, end) of its `layers`."""

    def __init__(self, model: nn.Module, layout: Layout, layer_range: tuple[int, int],
                 template: list):
        self.inner = module_at(model, layout.inner)
        self.start, self.end = layer_range
        blocks = list(self.inner["layers"])
        self.kinds = [cache_kind(c) for c in template]
        self.template = template
        self.inner["layers"] = [_Slot(self, i, b) for i, b in enumerate(blocks)]
        self.embedding = self.inner[layout.embed]
        self.inner[layout.embed] = _Feed(self, self.embedding)
        self._embed_key = layout.embed
        self._feeding = None  # the hidden state fed in at block `start` (None: embedding)
        self._taken = None  # what comes out of block end - 1 (or goes into block 0)
        self._progress = None

    def replace_embedding(self, embedding) -> None:
        """Embed tokens with `embedding` (a tensor-parallel stage 0's VocabShard)."""
        self.embedding = embedding
        self.inner[self._embed_key]._embedding = embedding

    def embed(self, tokens: mx.array) -> mx.array:
        """tokens: [B, L] -> the hidden state the shell feeds its first block: [B, L, D]."""
        self._feeding, self._taken = None, None
        self.inner(tokens)
        return self._taken

    def forward(self, h: mx.array, caches: list, progress=None) -> mx.array:
        """Run blocks [start, end) on h: [B, L, D] with their caches (this range's)."""
        self._feeding, self._taken, self._progress = h, None, progress
        try:
            self.inner(mx.zeros(h.shape[:2], mx.int32), cache=self._all_caches(caches))
            return self._taken
        finally:
            self._feeding, self._progress = None, None

    def _all_caches(self, caches: list) -> list:
        """A cache for every layer: this range's, and for the others one of this range's of
        the same kind (the shell may build a block's mask from another layer's cache of its
        kind, e.g. cache[0]; every cache of a kind holds the same positions), else an empty
        one, whose mask no block here uses."""
        start, end = self.start, self.end
        same = {}
        for i in range(start, end):
            same.setdefault(self.kinds[i], caches[i - start])
        out = []
        for i, kind in enumerate(self.kinds):
            if start <= i < end:
                out.append(caches[i - start])
            else:
                stand_in = same.get(kind)
                out.append(copy.deepcopy(self.template[i]) if stand_in is None else stand_in)
        return out

    def _step(self, index: int, block, x, args, kwargs):
        if self._feeding is None:  # embedding: keep what the first block would get
            if index == 0:
                self._taken = x
            return x
        if not self.start <= index < self.end:
            return x
        if index == self.start:
            x = self._feeding
        y = block(x, *args, **kwargs)
        if self._progress is not None:
            # On a GPU, queue the layer and go on (a host round trip per layer would stall the
            # GPU); on the CPU the layer computes here, between two calls into MPI.
            (mx.async_eval if mx.default_device() == mx.gpu else mx.eval)(y)
            self._progress()
        if index == self.end - 1:
            self._taken = y
        return y
