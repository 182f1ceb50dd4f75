"""make_model: offline random-weight mlx-lm folders that load, generate and shard."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes

from pipeline.model.make_model import PRESETS, make_model, preset_config, text_config

TINY = sorted(p for p in PRESETS if p.startswith("tiny-"))
PROMPT = [{"role": "user", "content": "Tell me about the river."}]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Build each (preset, options) folder once per module."""
    cache = {}

    def get(like, **kw):
        key = (like, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_model(like, tmp_path_factory.mktemp(like), **kw)
        return cache[key]

    return get


def _greedy(model, tokenizer, n=16):
    prompt = mx.array(tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True))
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n)]


def _logits(path):
    model, tokenizer = load(str(path))
    ids = tokenizer.encode("The children walked to school along the old stone road.")
    return model(mx.array([ids]))


@pytest.mark.parametrize("like", TINY)
def test_tiny_preset_loads_and_generates_varied_tokens(made, like):
    path = made(like)
    model, tokenizer = load(str(path))
    tokens = _greedy(model, tokenizer)
    assert len(tokens) == 16
    # Random weights must not collapse into one repeated token: tests compare sequences.
    assert len(set(tokens)) >= 5, tokens
    assert isinstance(tokenizer.decode(tokens), str)


@pytest.mark.parametrize("like", TINY)
@pytest.mark.usefixtures("on_cpu")  # the two models' logits compared bit for bit
def test_two_shards_split_by_layer_and_match_one_file(made, like):
    one, two = made(like), made(like, shards=2)
    index = json.loads((two / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    stored = {}
    for f in files:
        stored.update({k: f for k in mx.load(str(two / f))})
    assert stored == weight_map  # the index covers every tensor, and only those
    assert not (one / "model.safetensors.index.json").exists()
    assert set(mx.load(str(one / "model.safetensors"))) == set(weight_map)

    n = text_config(json.loads((two / "config.json").read_text()))["num_hidden_layers"]
    file_of_layer = {}
    for name, f in weight_map.items():
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert file_of_layer.setdefault(layer, f) == f  # a layer lives in one file
    assert sorted(file_of_layer) == list(range(n))
    assert file_of_layer[0] == files[0] and file_of_layer[n - 1] == files[1]
    embedding = next(k for k in weight_map if k.endswith("model.embed_tokens.weight"))
    assert weight_map[embedding] == files[0]

    assert mx.array_equal(_logits(one), _logits(two))


@pytest.mark.parametrize("like", TINY)
def test_quantized_4bit_loads_and_runs(made, like):
    path = made(like, quantize_bits=4)
    config = json.loads((path / "config.json").read_text())
    # group size 64, or 32 where an input dimension is not a multiple of 64 (small experts)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["mode"] == "affine"
    assert config["quantization"]["group_size"] in (32, 64)
    assert config["quantization_config"] == config["quantization"]
    weights = mx.load(str(path / "model.safetensors"))
    assert any(".layers.0." in k and v.dtype == mx.uint32 for k, v in weights.items())
    model, tokenizer = load(str(path))
    assert len(set(_greedy(model, tokenizer))) >= 3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_stored_and_runs(made, dtype):
    path = made("tiny-qwen2", dtype=dtype)
    weights = mx.load(str(path / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {getattr(mx, dtype)}
    model, tokenizer = load(str(path))
    assert len(set(_greedy(model, tokenizer, n=8))) >= 3


def test_tied_heads_have_no_lm_head(made):
    for like in TINY:
        names = set(mx.load(str(made(like) / "model.safetensors")))
        tied = PRESETS[like]["tie_word_embeddings"]
        assert ("lm_head.weight" in names) != tied, like


def test_gemma3_has_sliding_and_global_layers(made):
    model, _ = load(str(made("tiny-gemma3")))
    sliding = [layer.self_attn.is_sliding for layer in model.layers]
    assert any(sliding) and not all(sliding)
    # gemma3_text ties its head only because the checkpoint has no lm_head.weight
    assert "lm_head" not in model


def test_tokenizer_round_trip_and_chat_template(made):
    _, tokenizer = load(str(made("tiny-llama")))
    assert len(tokenizer._tokenizer) == 512
    assert not any("reserved" in t for t in tokenizer.convert_ids_to_tokens(list(range(512))))
    text = "Hello  world!\n\tThe storm arrived at 9:30. Ünïcödé 🙂 ok "
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_ids == {2}
    chat = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert chat == ("<|im_start|>user\nTell me about the river.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert ids[0] == 1 and ids.count(2) == 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_model("tiny-phi3", tmp_path / "a", seed=3, shards=3)
    b = make_model("tiny-phi3", tmp_path / "b", seed=3, shards=3)
    c = make_model("tiny-phi3", tmp_path / "c", seed=4, shards=3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    shard = "model-00002-of-00003.safetensors"
    assert shard in names and (a / shard).read_bytes() != (c / shard).read_bytes()


def test_same_bytes_in_another_process(tmp_path):
    # Hash seeds and thread pools differ between processes (tokenizer training included).
    make_model("tiny-qwen3", tmp_path / "here", seed=1)
    code = ("import sys; from pipeline.model.make_model import make_model; "
            "make_model('tiny-qwen3', sys.argv[1], seed=1)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
    for f in (tmp_path / "here").iterdir():
        assert f.read_bytes() == (tmp_path / "there" / f.name).read_bytes(), f.name


def test_rewrite_removes_stale_shards(tmp_path):
    make_model("tiny", tmp_path, shards=3)
    make_model("tiny", tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    load(str(tmp_path))


def test_num_layers_override(made):
    path = made("tiny-mistral", num_layers=2)
    model, _ = load(str(path))
    assert len(model.layers) == 2


# Published parameter counts; building the module is lazy, so this costs no memory.
@pytest.mark.parametrize("like,params", [
    ("smollm2-135m", 134_515_008),
    ("qwen2.5-0.5b", 494_032_768),
    ("llama-3.2-1b", 1_235_814_400),
])
def test_real_shape_presets_match_published_sizes(like, params):
    config = preset_config(like)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == params


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        make_model("gpt-5", tmp_path)
    with pytest.raises(ValueError, match="shards"):
        make_model("tiny", tmp_path, shards=8)
    with pytest.raises(ValueError, match="quantize_bits"):
        make_model("tiny", tmp_path, quantize_bits=3)
    with pytest.raises(ValueError, match="dtype"):
        make_model("tiny", tmp_path, dtype="int8")
