"""Random-weight model folders in mlx-lm format, made fully offline.

`make_model("tiny-gemma3", out)` writes config.json, safetensors weights (one file, or one
per group of layers with an index), and a small byte-level BPE tokenizer with a ChatML chat
template: a folder that `mlx_lm.load` opens like any mlx-community checkpoint. The tiny
presets are for tests (one per architecture quirk the pipeline handles); the others have the
published shapes of real models, for benchmarks.

Vocabulary: tiny presets use the tokenizer's own 512 tokens. Real-shape presets keep the
real vocab_size (the embedding and head dominate small models' cost), and the tokenizer is
padded to that size with unreachable "<|reserved_N|>" entries, so every id the model can
emit decodes to text.
"""

from __future__ import annotations

import contextlib
import io
import json
import zlib
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model, save_config

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TINY_VOCAB = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# 7 layers so that splits over 2 and 3 ranks are uneven; kv heads 2 exercise GQA.
_TINY = dict(hidden_size=64, num_hidden_layers=7, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             max_position_embeddings=2048, vocab_size=TINY_VOCAB)

PRESETS: dict[str, dict] = {
    "tiny-llama": dict(_TINY, model_type="llama", architectures=["LlamaForCausalLM"],
                       rope_theta=10000.0, tie_word_embeddings=True),
    # mlx-lm remaps "mistral" to its llama module; one kv head, separate lm_head.
    "tiny-mistral": dict(_TINY, model_type="mistral", architectures=["MistralForCausalLM"],
                         num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=False),
    # mlx-lm's qwen2 always has q/k/v biases.
    "tiny-qwen2": dict(_TINY, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                       head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    # Layers 2 and 5 are global (every 3rd), the others slide over 8 tokens. mlx-lm's
    # gemma3_text ignores tie_word_embeddings: it ties exactly when lm_head.weight is
    # absent from the checkpoint, so we leave it out (as Gemma 3 does).
    "tiny-gemma3": dict(_TINY, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                        head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                        sliding_window_pattern=3, rope_theta=1e6,
                        rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=True),
    # Fused qkv_proj and gate_up_proj.
    "tiny-phi3": dict(_TINY, model_type="phi3", architectures=["Phi3ForCausalLM"],
                      rope_theta=10000.0, tie_word_embeddings=False),
    # Heads (6), KV heads (6) and MLP width (192) that split 2 and 3 ways: tensor parallel.
    "tiny-llama-6h": dict(_TINY, model_type="llama", architectures=["LlamaForCausalLM"],
                          hidden_size=96, head_dim=16, num_attention_heads=6,
                          num_key_value_heads=6, intermediate_size=192, rope_theta=10000.0,
                          tie_word_embeddings=False),
    # Mixture-of-experts presets: 4 experts, 2 per token, small expert MLPs.
    "tiny-qwen3-moe": dict(_TINY, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                           head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, num_experts=4,
                           num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                           moe_intermediate_size=32, norm_topk_prob=True,
                           tie_word_embeddings=False),
    # Multi-head latent attention (compressed keys/values), a dense first layer, one shared
    # expert, sigmoid routing over 2 groups.
    "tiny-deepseek-v3": dict(_TINY, model_type="deepseek_v3",
                             architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=4,
                             moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4,
                             num_experts_per_tok=2, n_group=2, topk_group=1,
                             routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=32,
                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                             first_k_dense_replace=1, moe_layer_freq=1, rope_theta=10000.0,
                             tie_word_embeddings=False),
    # Partial rotary embedding, q/k norms, a dense first layer.
    "tiny-glm4-moe": dict(_TINY, model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"],
                          head_dim=16, moe_intermediate_size=32, n_shared_experts=1,
                          n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                          routed_scaling_factor=1.0, first_k_dense_replace=1,
                          norm_topk_prob=True, use_qk_norm=True, attention_bias=False,
                          partial_rotary_factor=0.5, rope_theta=10000.0, rope_scaling=None,
                          tie_word_embeddings=False),
    # Sliding (8 tokens) and full attention alternate; attention sinks; experts with biases.
    "tiny-gpt-oss": dict(_TINY, model_type="gpt_oss", architectures=["GptOssForCausalLM"],
                         head_dim=16, intermediate_size=64, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=8, rope_theta=150000.0,
                         layer_types=["sliding_attention", "full_attention"] * 3
                         + ["sliding_attention"], tie_word_embeddings=False),
    "tiny-mixtral": dict(_TINY, model_type="mixtral", architectures=["MixtralForCausalLM"],
                         num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
                         tie_word_embeddings=False),
    # Hybrid: gated delta-net linear attention (recurrent state, ArraysCache) with full
    # attention every 3rd layer (2 and 5), so a rank of 2 layers may hold only linear ones.
    "tiny-qwen3-next": dict(_TINY, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"],
                            head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                            linear_key_head_dim=16, linear_value_head_dim=16,
                            linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                            decoder_sparse_step=1, shared_expert_intermediate_size=32,
                            mlp_only_layers=[], moe_intermediate_size=32, norm_topk_prob=True,
                            rope_theta=1e6, partial_rotary_factor=0.25,
                            full_attention_interval=3, rms_norm_eps=1e-6,
                            tie_word_embeddings=False),
    # An architecture no code here names: q/k norms over whole projections, post-norms.
    "tiny-olmo2": dict(_TINY, model_type="olmo2", architectures=["Olmo2ForCausalLM"],
                       rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Multimodal checkpoint layout: a text model nested under `text_config`, its weights
    # under `language_model.` (Gemma 3 style); only the text part exists here.
    "tiny-gemma3-vl": dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                           vocab_size=TINY_VOCAB, text_config=dict(
                               _TINY, model_type="gemma3_text", head_dim=16,
                               query_pre_attn_scalar=16, sliding_window=8,
                               sliding_window_pattern=3, rope_theta=1e6,
                               rope_local_base_freq=10000.0, rms_norm_eps=1e-6),
                           vision_config=dict(model_type="siglip_vision_model"),
                           tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                         hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, vocab_size=49152,
                         tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                         hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1e6, max_position_embeddings=32768,
                         vocab_size=151936, tie_word_embeddings=True),
    # ~209M parameters, qwen2-shaped (mlx-lm's own --pipeline mode supports qwen2): the
    # benchmark model for throughput comparisons on CPU
    "bench-qwen2-200m": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                             hidden_size=1024, num_hidden_layers=16, intermediate_size=2816,
                             num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
                             rope_theta=1e6, max_position_embeddings=32768,
                             vocab_size=32000, tie_word_embeddings=True),
    # The mixture-of-experts benchmark model (issue 13): qwen3_moe-shaped, 16 layers of 16
    # experts (4 per token) of width 256 beside attention of 16 heads (4 KV heads): 277M
    # parameters held, ~45M of them read per token. float32 by default, like bench-qwen2-200m.
    "bench-qwen3-moe-280m": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                                 hidden_size=1024, num_hidden_layers=16, intermediate_size=2816,
                                 num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                 rms_norm_eps=1e-6, rope_theta=1e6,
                                 max_position_embeddings=32768, vocab_size=32000,
                                 num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1,
                                 mlp_only_layers=[], moe_intermediate_size=256,
                                 norm_topk_prob=True, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                         hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=131072, vocab_size=128256,
                         tie_word_embeddings=True,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0,
                                       "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192,
                                       "rope_type": "llama3"}),
}
ALIASES = {"tiny": "tiny-llama"}

# Training text for the tokenizer: enough plain English for 509 merges.
_CORPUS = """\
The river wound slowly through the valley, carrying leaves and small branches toward the
sea. On its banks the farmers planted wheat in the spring and harvested it at the end of the
summer, when the days were long and the evenings were warm.

In the morning the children walked to school along the old stone road. They talked about
the weather, about their friends, and about the stories their grandparents told them at
night. Some of those stories were about kings and castles; others were about ordinary people
who found something unexpected in their own gardens.

A computer program is a list of instructions that a machine follows one step at a time.
Good programs are written for people to read as well as for machines to run: each function
has a clear name, each module does one thing, and the tests explain what the code promises.

The library opened at nine o'clock every day except Sunday. Students came to study, writers
came to think, and a few old men came simply to read the newspapers in the quiet room near
the window. The librarian knew most of them by name and remembered which books they liked.

When the storm arrived, the wind pulled at the roofs and the rain fell so heavily that the
streets turned into shallow rivers. People stayed inside, lit candles, cooked soup, and
listened to the thunder rolling over the hills until the sky finally cleared after midnight.

Questions are the beginning of learning. Why is the sky blue? How far away is the moon?
What makes bread rise, and why does ice float on water? Every answer leads to another
question, and that is what makes science such a long and interesting journey for everyone.

Music travels across borders more easily than words. A melody played on a violin in one
country can be whistled by a fisherman in another, changed a little, and carried further
still. Over hundreds of years, songs have mixed, split, and grown into new traditions.

Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear everywhere: in prices, in dates, in
recipes that ask for 250 grams of flour and 3 eggs, and in the scores of football matches.
"""


def _tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE trained on _CORPUS, padded with reserved tokens to `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level pieces: every string encodes, and decode inverts encode.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, TINY_VOCAB), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.split("\n\n"), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    # Entries without merges are never produced by encode, yet decode to readable text.
    for i in range(len(vocab), vocab_size):
        vocab[f"<|reserved_{i}|>"] = i
    if len(vocab) != vocab_size:
        raise AssertionError(f"tokenizer has {len(vocab)} tokens, wanted {vocab_size}")
    return json.dumps(data, ensure_ascii=False, indent=1)


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }


def preset_config(like: str, num_layers: int | None = None) -> dict:
    """The config.json dict of a preset (see PRESETS; "tiny" = "tiny-llama")."""
    name = ALIASES.get(like, like)
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{like}': choose from "
                         + ", ".join(sorted([*PRESETS, *ALIASES])))
    config = json.loads(json.dumps(PRESETS[name]))  # deep copy
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        text_config(config)["num_hidden_layers"] = num_layers
    config["bos_token_id"] = None
    config["eos_token_id"] = SPECIAL_TOKENS.index("<|im_end|>")
    config["pad_token_id"] = SPECIAL_TOKENS.index("<|endoftext|>")
    return config


def text_config(config: dict) -> dict:
    """The text model's part of a config (multimodal configs nest it under text_config)."""
    return config.get("text_config", config)


def _random_tensor(name: str, shape: tuple, seed: int, model_type: str) -> mx.array:
    """Deterministic weights that keep activations O(1) so greedy decoding varies.

    Each tensor has its own key (seed, name): values do not depend on creation order, layer
    count or sharding. Embeddings are small (std 0.02) so the residual stream is soon
    dominated by the layers' outputs: otherwise a tied head mostly scores the input token
    itself and greedy decoding repeats it. Matrices get std 2/sqrt(fan_in): at 1/sqrt(fan_in)
    greedy decoding often falls into a 1-3 token loop, at 2 it mostly does not (8 seeds x
    tiny presets: 10-15 distinct tokens of 16 on average, gemma3 lowest).
    """
    key = mx.random.key((seed % 2**32) << 32 | zlib.crc32(f"{model_type}:{name}".encode()))
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name:
        # gemma RMSNorm multiplies by (1 + weight): zero there means unit gain.
        return mx.zeros(shape) if model_type.startswith("gemma") else mx.ones(shape)
    if leaf == "bias":
        return 0.1 * mx.random.normal(shape, key=key)
    std = 0.02 if "embed_tokens" in name else 2.0 * shape[-1] ** -0.5
    return std * mx.random.normal(shape, key=key)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _shard_names(weights: dict, num_layers: int, shards: int) -> dict[str, str]:
    """Tensor name -> file name: contiguous layer groups, embedding first, head last."""
    if shards == 1:
        return {k: "model.safetensors" for k in weights}
    bounds = [i * num_layers // shards for i in range(shards + 1)]
    mapping = {}
    for k in weights:
        layer = _layer_of(k)
        if layer is None:
            index = 0 if "embed_tokens" in k else shards - 1
        else:
            index = max(i for i in range(shards) if bounds[i] <= layer)
        mapping[k] = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
    return mapping


def make_model(like: str, out_dir, *, dtype: str = "float32", seed: int = 0,
               num_layers: int | None = None, shards: int = 1,
               quantize_bits: int | None = None) -> Path:
    """Write a random-weight mlx-lm model folder shaped like preset `like` into `out_dir`.

    dtype: float32, float16 or bfloat16. seed: same seed (and arguments) -> same bytes.
    num_layers: override the preset's layer count. shards > 1: that many safetensors
    files split by layer, plus model.safetensors.index.json. quantize_bits 4 or 8:
    affine-quantize like `mlx_lm.convert -q` (group size 64, or 32 where 64 does not fit).
    Returns the folder path.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    if quantize_bits not in (None, 4, 8):
        raise ValueError("quantize_bits must be None, 4 or 8")
    config = preset_config(like, num_layers)
    n_layers = text_config(config)["num_hidden_layers"]
    if not 1 <= shards <= n_layers:
        raise ValueError(f"shards must be between 1 and the layer count ({n_layers})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # Replace mlx-lm's own (lazy, never evaluated) init with our deterministic weights.
    weights = {
        k: _random_tensor(k, v.shape, seed, config["model_type"]).astype(DTYPES[dtype])
        for k, v in tree_flatten(model.parameters())
    }
    if config["tie_word_embeddings"]:
        for k in [k for k in weights if k.endswith("lm_head.weight")]:
            del weights[k]
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)  # e.g. gemma3_text drops its lm_head here
    model.load_weights(list(weights.items()), strict=True)

    if quantize_bits is not None:
        in_dims = [v.shape[-1] for k, v in weights.items() if v.ndim >= 2]  # experts: 3-D
        group_size = 64 if all(d % 64 == 0 for d in in_dims) else 32
        with contextlib.redirect_stdout(io.StringIO()):  # silence its "[INFO] bpw" line
            model, config = quantize_model(model, config, group_size, quantize_bits)
        weights = dict(tree_flatten(model.parameters()))

    files = _shard_names(weights, n_layers, shards)
    for old in out.glob("model*.safetensors"):  # a stale shard would be loaded too
        old.unlink()
    for fname in sorted(set(files.values())):
        part = {k: weights[k] for k in sorted(weights) if files[k] == fname}
        mx.save_safetensors(str(out / fname), part, metadata={"format": "mlx"})
    index = out / "model.safetensors.index.json"
    if shards > 1:
        total = sum(v.nbytes for v in weights.values())
        index.write_text(json.dumps({"metadata": {"total_size": total},
                                     "weight_map": dict(sorted(files.items()))}, indent=2))
    elif index.exists():
        index.unlink()

    save_config(config, out / "config.json")
    (out / "tokenizer.json").write_text(_tokenizer_json(config["vocab_size"]),
                                        encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    return out
