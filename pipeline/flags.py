"""The flags several commands share (mlx_lm's names where it has them), defined once."""

import typer

from pipeline.exec.draft import DEFAULT_NUM_DRAFT_TOKENS
from pipeline.exec.driver import DEFAULT_PREFILL_CHUNK
from pipeline.exec.prefix import DEFAULT_PROMPT_CACHE_BYTES
from pipeline.exec.sampling import DEFAULT_MAX_TOKENS


# Options shared by the chat/one-shot entry and the batch command (mlx_lm's flag names).
MODEL = typer.Option(None, "--model", "-m", help="Model folder, .gguf file or Hugging Face repo. "
                     "Default: embedded SmolLM2-135M-Instruct.")
MAX_TOKENS = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", help="Tokens to generate at most.")
TEMP = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy.")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1].")
MIN_P = typer.Option(0.0, "--min-p", help="Minimum probability relative to the top token.")
SEED = typer.Option(None, "--seed", help="Random seed for sampling.")
SYSTEM = typer.Option(None, "--system", help="System prompt (chat mode).")
CHAT = typer.Option(None, "--chat/--no-chat",
                    help="Apply the chat template [default: on if the tokenizer has one].")
SPLIT = typer.Option(None, "--split", help="Layers per rank, e.g. 10,12,8 (must sum to the layer count).")
DTYPE = typer.Option(None, "--dtype", help="Cast floating weights (quantization scales included): "
                     "float32, float16 or bfloat16; checkpoint: cast nothing, as mlx-lm (same "
                     "tokens) [default: float32 on CPU (faster), checkpoint on GPU].")
PREFILL_CHUNK = typer.Option(DEFAULT_PREFILL_CHUNK, "--prefill-chunk",
                             help="Prompt tokens per pipelined prefill chunk.")
DEQUANTIZE = typer.Option(None, "--dequantize/--no-dequantize",
                          help="Expand quantized weights to dense ones at load (faster on CPU, more "
                          "memory) [default: only for the embedded model on CPU].")
IGNORE_EOS = typer.Option(False, "--ignore-eos", help="Generate max-tokens even after EOS.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Per-rank logs on stderr.")
HOSTFILE = typer.Option(None, "--hostfile", help="Hostfile whose `# pipeline: mem=48G` comments "
                        "cap each host's memory for the placement (same file as mpirun's).")
MAX_CONTEXT = typer.Option(None, "--max-context", help="KV-cache tokens each rank must have room "
                           "for [default: the model's context length, else 8192].")
MEMORY_FRACTION = typer.Option(0.8, "--memory-fraction",
                               help="Share of each rank's memory the placement may use.")
DISTRIBUTE = typer.Option(None, "--distribute/--no-distribute",
                          help="Send each rank the model files it lacks or holds differently "
                          "from rank 0 (sha256-checked); --distribute also for hub repos "
                          "(rank 0 downloads, sends); --no-distribute: stop instead. "
                          "Default: send when needed.")

PROMPT_LOOKUP = typer.Option(True, "--prompt-lookup/--no-prompt-lookup",
                             help="Speculative decoding: propose the tokens that followed the "
                             "last few tokens earlier in the prompt or answer, and let the "
                             "model check several at once (same tokens as without, up to "
                             "rounding ties; --draft-exact: token for token).")
NUM_DRAFT_TOKENS = typer.Option(DEFAULT_NUM_DRAFT_TOKENS, "--num-draft-tokens",
                                help="The most tokens proposed per pass (adapts below that).")
DRAFT_MODEL = typer.Option(None, "--draft-model", help="Speculative decoding with proposals "
                           "from this small model (same tokenizer), held by rank 0 only.")
DRAFT_EXACT = typer.Option(False, "--draft-exact", help="Speculative decoding keeps a proposal "
                           "only when no rounding of the verification pass could change the "
                           "model's pick there: plain decoding's tokens token for token, but "
                           "few proposals kept in 16-bit. Default: keep a proposal when it is "
                           "the model's pick (greedy) or by standard speculative sampling; may "
                           "differ from plain decoding where two logits tie within rounding.")

SHARE_HEAD = typer.Option(True, "--share-head/--no-share-head",
                          help="With 2+ ranks the last one holds part of the head's rows and "
                          "computes that part of every batched decode step, as much as evens "
                          "out the stages' measured time (costs it up to 3/4 of the head's "
                          "memory; dropped when that does not fit).")

TP = typer.Option(None, "--tp", help="Ranks per stage, splitting each of its layers (tensor "
                  "parallel, all-reduces inside the MLX graph); 1: a pure pipeline "
                  "[default: the planner chooses per link, see `plan`].")
PROMPT_CACHE_BYTES = typer.Option(
    f"{DEFAULT_PROMPT_CACHE_BYTES // 2**30}G", "--prompt-cache-bytes",
    help="Memory each rank may keep for the prompt cache: the KV caches of finished "
    "sequences (prompt and answer), reused by any later prompt that starts with the same "
    "tokens, least recently used dropped first; e.g. 512M, 4G; 0 turns it off.")
OPTIMIZE = typer.Option(None, "--optimize", help="What the placement optimizes: chat (one "
                        "sequence's token time) or throughput (many sequences at once) "
                        "[default: chat for the REPL and one-shot, throughput for batch, serve "
                        "and bench].")
