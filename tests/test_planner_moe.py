"""Sizing the large mixture-of-experts models from their config.json alone."""

from pipeline.place.cost import config_cost

Q4 = {"group_size": 64, "bits": 4}

# Shapes from the models' config.json on Hugging Face, as quoted by the pages named (the hub
# itself was not reachable from here); quantized like mlx_lm.convert -q (4 bits, groups of 64).
# deepseek-ai/DeepSeek-V3 (and -0324, same shapes): gist.github.com/vinhnx/
# 40eaf98b4bb51f0770276020a690bad5 explains its config.json field by field. The checkpoint's
# layer 61 (multi-token prediction) is beyond num_hidden_layers: mlx-lm drops it.
DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=7168,
    num_hidden_layers=61, intermediate_size=18432, moe_intermediate_size=2048,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
    moe_layer_freq=1, n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512,
    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=128,
    num_key_value_heads=128, vocab_size=129280, max_position_embeddings=163840,
    rms_norm_eps=1e-6, rope_theta=10000, tie_word_embeddings=False, torch_dtype="bfloat16",
    quantization=Q4)
# Qwen/Qwen3-235B-A22B: the shapes github.com/zyzshishui/slime passes Megatron for it
# (scripts/models/qwen3-235B-A22B.sh: 94 layers, hidden 4096, 64/4 heads of 128, 128 experts
# of 1536, top 8, vocab 151936, untied); every layer sparse; max_position_embeddings 40960 is
# from memory of its config.json, not checked here (it only sizes the KV cache).
QWEN3_235B = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=4096,
    num_hidden_layers=94, intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
    num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
    num_attention_heads=64, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    torch_dtype="bfloat16", quantization=Q4)
# moonshotai/Kimi-K2-Instruct: model_type kimi_k2 with DeepseekV3ForCausalLM (mlx-lm maps it
# to deepseek_v3's class), vocab 163840, 384 routed experts + 1 shared, 8 per token, 64 heads,
# 61 layers, 128K context (www.lryc.cn/news/588730.html walks through its config.json;
# apxml.com/models/kimi-k2-instruct); first_k_dense_replace 1 as in the Kimi-K2 configs
# quoted in public parameter-counting tests (the same architecture as K2-Thinking).
KIMI_K2 = dict(
    DEEPSEEK_V3, model_type="kimi_k2", n_routed_experts=384, first_k_dense_replace=1, n_group=1,
    topk_group=1, num_attention_heads=64, num_key_value_heads=64, vocab_size=163840,
    max_position_embeddings=131072)


def q_bytes(n: int, bits: int = 4) -> int:
    """A matrix of n weights quantized in groups of 64: packed bits + a bf16 scale and bias each."""
    return n * bits // 8 + 2 * (n // 64) * 2


def q_bytes(n: int, bits: int = 4) -> int:
    """A matrix of n weights quantized in groups of 64: packed bits + a bf16 scale and bias each."""
    return n * bits // 8 + 2 * (n // 64) * 2


def test_latent_attention_caches_the_latent():
    # DeepSeek-V3 / Kimi-K2 (mlx-lm's deepseek_v3 class) cache kv_lora_rank + the rope part
    # per layer, not 128 heads of keys and values: 61 x 1152 B x 163840 tokens = 10.7 GiB
    assert config_cost(DEEPSEEK_V3).kv_token_bytes == ((512 + 64) * 2,) * 61
    assert config_cost(KIMI_K2).kv_token_bytes == ((512 + 64) * 2,) * 61
    assert config_cost(QWEN3_235B).kv_token_bytes == (2 * 4 * 128 * 2,) * 94


def test_a_separate_head_when_the_args_lack_the_flag():
    # deepseek_v3's ModelArgs has no tie_word_embeddings: the config's false decides
    h, vocab = 7168, 129280
    head = 2 * q_bytes(vocab * h) + 2 * h  # embedding, lm_head, final norm
    assert config_cost(DEEPSEEK_V3).head_bytes == head
    assert "separate head" in config_cost(DEEPSEEK_V3).description
