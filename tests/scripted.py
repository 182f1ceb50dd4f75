"""A tiny model whose greedy answers are scripted, for end-to-end tests of tool calls and
reasoning through the real pipeline (mpirun, ranks, engine, sampler, server).

make_scripted_model writes a tiny-mistral folder (random layers, untied head) whose tokenizer
has one added token per script piece and whose chat template is hermes/Qwen-style: tools in the
system prompt, <tool_call> JSON blocks, <tool_response> results, and Qwen3's `enable_thinking`
(false closes an empty <think></think> in the prompt), so mlx-lm infers its json_tools parser
and its think markers as it would for Qwen. The weights make greedy decoding a chain: each
script's first piece follows the last token of its generation prompt, each piece the one
before, and EOS the last. A chain token's embedding is one large coordinate of its own, which
the final norm keeps whatever the random layers add, and the head's row of its successor reads
that coordinate. No other token reaches those coordinates: from them the model is an ordinary
random one.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from pipeline.model.make_model import make_model

# HF renders templates with trim_blocks: a newline right after a block tag is dropped.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ message.content }}"
    "{% for tool_call in message.tool_calls or [] %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '\n<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": '
    "{{ tool_call.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>{% endif %}"
    "{% endif %}"
)

# With thinking (the default: <think> is in the vocabulary): reasoning split over two tokens at
# its end marker, a sentence, then two calls: the first's start marker split over two tokens
# and its JSON over two more, the second's marker whole.
THINKING = ["<think>", "The user wants the weather.", "\n</th", "ink>\n\n",
            "I will check both cities.", "\n<tool_", 'call>\n{"name": "get_weather", ',
            '"arguments": {"city": "Paris"}}\n</tool_call>', "\n<tool_call>",
            '{"name": "get_time", "arguments": {"zone": "CET"}}', "</tool_call>"]
# enable_thinking false: a sentence, then a call whose arguments are not JSON.
NOT_THINKING = ["Checking.", '\n<tool_call>\n{"name": "get_weather", ',
                '"arguments": {"city"}}\n</tool_call>']
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                       "required": ["zone"]}}}]
# For the agent CLIs (tests/test_agent_cli.py): a first turn that calls Claude Code's Bash tool
# and Codex's exec_command (each client gets one call it knows; the other comes back as text),
# and, once a tool result ends the conversation, "Done.": the agent template closes the think
# block after a tool message as enable_thinking false does, so that answer is the second script.
AGENT_THINKING = ["<think>", "The user wants the marker.", "\n</th", "ink>\n\n",
                  "I will write the marker.", "\n<tool_call>\n",
                  '{"name": "Bash", "arguments": {"command": "echo pipeline-ok > '
                  'cc-marker.txt", "description": "Write a marker file"}}', "\n</tool_call>",
                  "\n<tool_call>",
                  '{"name": "exec_command", "arguments": {"cmd": "echo pipeline-ok > '
                  'cx-marker.txt"}}', "</tool_call>"]
AGENT_AFTER_TOOL = ["Done."]
AGENT_TEMPLATE = TEMPLATE.replace(
    "{% if enable_thinking is defined and not enable_thinking %}",
    "{% if (enable_thinking is defined and not enable_thinking) or "
    "messages[-1].role == 'tool' %}")
assert AGENT_TEMPLATE != TEMPLATE
BIG = 1000.0  # a chain token's embedding coordinate
READ = 10.0  # the head's weight on it, in the successor's row


def make_scripted_model(out: Path, template: str = TEMPLATE, thinking: list[str] = THINKING,
                        not_thinking: list[str] = NOT_THINKING) -> Path:
    """The scripted model in `out`; `template`: its chat template (one that ignores
    enable_thinking scripts the `thinking` answer only); the two scripts: the answers with
    thinking on (the template's default) and off."""
    path = make_model("tiny-mistral", out, num_layers=4)
    pieces = thinking + not_thinking + ["</think>"]  # </think>: the think marker, in the vocab
    data = json.loads((path / "tokenizer.json").read_text())
    base = len(data["model"]["vocab"])
    assert len(set(pieces)) == len(pieces) and not data["added_tokens"][3:]
    data["added_tokens"] += [{"id": base + i, "content": p, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False,
                              "special": False} for i, p in enumerate(pieces)]
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = vocab = base + len(pieces)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))

    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(path)
    ids = {p: base + i for i, p in enumerate(pieces)}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    chains = []
    for kwargs, script in (({}, thinking), ({"enable_thinking": False}, not_thinking)):
        prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS,
                                         add_generation_prompt=True, **kwargs)
        if chains and chains[0][0] == prompt[-1]:
            break  # the template ignores enable_thinking: one script only
        chains.append([prompt[-1], *(ids[p] for p in script), eos])
    follows = {t: nxt for chain in chains for t, nxt in zip(chain, chain[1:])}
    assert len(follows) == sum(len(c) - 1 for c in chains), "two chains share a token"

    weights = mx.load(str(path / "model.safetensors"))
    dim = weights["model.embed_tokens.weight"].shape[1]
    assert len(follows) <= dim
    key = mx.random.key(7)
    for name, std in (("model.embed_tokens.weight", 0.02), ("lm_head.weight", 2 * dim**-0.5)):
        w = weights[name]
        extra = std * mx.random.normal((vocab - w.shape[0], dim), key=key)
        weights[name] = mx.concatenate([w, extra.astype(w.dtype)])
    # Coordinates [0, n) are the chains' alone: no other embedding has them, no layer writes
    # them (the rows of its output projections there are zero), so from other tokens the
    # head's scripted weights read nothing.
    n = len(follows)
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name][:n] = 0
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    embed[:, :n] = 0
    for k, (token, nxt) in enumerate(follows.items()):
        embed[token] = mx.zeros((dim,), embed.dtype)
        embed[token, k] = BIG
        head[nxt, k] = READ
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


@pytest.fixture(scope="session")
def scripted_model(tmp_path_factory) -> Path:
    """The scripted model's folder, built once per session."""
    return make_scripted_model(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="session")
def scripted_chatml_model(tmp_path_factory) -> Path:
    """The scripted model with a plain ChatML template, which knows no tools."""
    from pipeline.model.make_model import CHAT_TEMPLATE

    return make_scripted_model(tmp_path_factory.mktemp("scripted-chatml"), CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def scripted_agent_model(tmp_path_factory) -> Path:
    """The scripted model for the agent CLIs (AGENT_THINKING, then AGENT_AFTER_TOOL)."""
    return make_scripted_model(tmp_path_factory.mktemp("scripted-agent"), AGENT_TEMPLATE,
                               AGENT_THINKING, AGENT_AFTER_TOOL)
