"""The generic stage: which models the pipeline runs (the probe), where their parts are, and
refusals that say what a model does that a share of its blocks cannot."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from helpers import NullTokenizer
from pipeline.exec.driver import Driver
from pipeline.exec.engine import Engine
from pipeline.model.load import build_model, load_stage, read_config
from pipeline.model.make_model import preset_config
from pipeline.model.shell import Shell, UnsupportedModel, probe
from pipeline.model.stage import cache_batch_problem

TINY = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512, rope_theta=10000.0,
            max_position_embeddings=2048)


def write_config(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("like, layout", [
    ("tiny-llama", ("model", "embed_tokens", "model.norm", "model.embed_tokens", True)),
    ("tiny-qwen3-next", ("model", "embed_tokens", "model.norm", "lm_head", False)),
    ("tiny-gpt-oss", ("model", "embed_tokens", "model.norm", "lm_head", False)),
])
def test_probe_finds_the_parts(tmp_path, like, layout):
    config = read_config(write_config(tmp_path, preset_config(like)))
    found = probe(build_model(config), config["model_type"])
    assert (found.inner, found.embed, found.norm, found.head, found.tied) == layout


def test_nested_text_config_is_read_for_planning(tmp_path):
    config = read_config(write_config(tmp_path, preset_config("tiny-gemma3-vl")))
    assert config["model_type"] == "gemma3" and config["num_hidden_layers"] == 7
    assert config["hidden_size"] == 64  # from text_config, for the planner


def test_nested_checkpoint_loads_its_text_part(model_dir):
    path = model_dir("tiny-gemma3-vl")
    stage = load_stage(path, read_config(path), (0, 7), with_head=True)
    assert stage.loaded_names[0].startswith("language_model.")
    assert stage.lm_head is None  # gemma3 ties its head when the checkpoint has no lm_head
    assert all(n.startswith("language_model.model.") for n in stage.loaded_names)


# Refused with the reason: what the model's forward does that a share of blocks cannot.
@pytest.mark.parametrize("config, reason", [
    (dict(TINY, model_type="granite", logits_scaling=4.0, attention_multiplier=0.25,
          embedding_multiplier=12.0, residual_multiplier=0.2, attention_bias=False,
          mlp_bias=False), "after its blocks it does more than a final norm and a head"),
    (dict(TINY, model_type="exaone", num_layers=4, layer_norm_epsilon=1e-5),
     "its blocks are in `h`, not a `layers` list"),
    (dict(TINY, model_type="gemma3n"), "per-layer inputs"),
    (dict(TINY, model_type="no_such_arch"), "unsupported model_type 'no_such_arch'"),
])
def test_refused_with_the_reason(tmp_path, config, reason):
    with pytest.raises(UnsupportedModel, match="model_type") as e:
        read_config(write_config(tmp_path, config))
    assert reason in str(e.value)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def __call__(self, x, mask=None, cache=None):
        return x + self.proj(x)


class Inner(nn.Module):
    """A shell like mlx-lm's, with one departure from the mould chosen by `quirk`."""

    def __init__(self, quirk: str):
        super().__init__()
        self.quirk = quirk
        self.embed_tokens = nn.Embedding(16, 8)
        self.layers = [Block() for _ in range(3)]
        self.norm = nn.RMSNorm(8)

    def __call__(self, inputs, cache=None):
        h = self.embed_tokens(inputs)
        cache = cache or [None] * 3
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, None, cache[0] if self.quirk == "shared-cache" else c)
            if self.quirk == "between":
                h = h * 2
            if self.quirk == "twice" and i == 2:
                h = layer(h, None, c)
        return self.norm(h)


class Outer(nn.Module):
    def __init__(self, quirk: str = ""):
        super().__init__()
        self.quirk = quirk
        self.model = Inner(quirk)
        self.lm_head = nn.Linear(8, 16)

    def __call__(self, inputs, cache=None):
        logits = self.lm_head(self.model(inputs, cache))
        return mx.tanh(logits) if self.quirk == "softcap" else logits


@pytest.mark.parametrize("quirk, reason", [
    ("between", "changes the hidden state between blocks"),
    ("shared-cache", "share caches across layers"),
    ("twice", "does not run each block once, in order"),
    ("softcap", "soft-capped"),
])
def test_probe_names_what_a_shell_does_differently(quirk, reason):
    with pytest.raises(UnsupportedModel, match=reason):
        probe(Outer(quirk), "toy")


def test_a_standard_toy_shell_runs_split_like_whole():
    """Three shells over one model's weights, holding blocks [0,1), [1,2), [2,3), equal
    the model's own forward, and the probe leaves the model as it was."""
    whole = Outer()
    mx.eval(whole.parameters())
    layout = probe(whole, "toy")
    assert isinstance(whole.model.layers[0], Block) and isinstance(whole.model.norm, nn.RMSNorm)
    tokens = mx.array([[1, 2, 3, 4]])
    expected = whole.model.layers[2](whole.model.layers[1](whole.model.layers[0](
        whole.model.embed_tokens(tokens))))
    h = None
    for start in range(3):
        part = Outer()
        part.update(whole.parameters())
        shell = Shell(part, layout, (start, start + 1), [KVCache() for _ in range(3)])
        h = shell.embed(tokens) if start == 0 else h
        h = shell.forward(h, [KVCache()])
    assert mx.allclose(h, expected)


def test_stand_in_caches_are_this_ranks_caches_of_the_same_kind():
    whole = Outer()
    template = [RotatingKVCache(max_size=8), KVCache(), RotatingKVCache(max_size=8)]
    shell = Shell(whole, probe(whole, "toy"), (1, 3), template)
    mine = [KVCache(), RotatingKVCache(max_size=8)]
    every = shell._all_caches(mine)
    assert every[1] is mine[0] and every[2] is mine[1]
    assert every[0] is mine[1]  # layer 0's masks come from a cache of its kind here


def test_a_cache_without_a_batched_form_is_refused_for_batches(model_dir):
    assert cache_batch_problem([KVCache(), RotatingKVCache(max_size=4)]) is None
    assert "QuantizedKVCache has no batched form" in cache_batch_problem([QuantizedKVCache()])
    path = model_dir("tiny-llama")
    stage = load_stage(path, read_config(path), (0, 7), with_head=True)
    stage.cache_factory = lambda: [QuantizedKVCache() for _ in range(7)]
    with pytest.raises(UnsupportedModel, match="cannot run batched: .*QuantizedKVCache"):
        Engine(Driver(None, stage, NullTokenizer(), 0), concurrency=2)
