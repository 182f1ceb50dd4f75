"""Chat requests for agents, parsed in process (pipeline/serve/chat.py, api.py): messages in
OpenAI's form (assistant tool_calls with JSON-string arguments, tool results, null and list
content) reach the chat template in the form templates expect; tools go to a template that knows
them, and to one that does not in the generic form; chat_template_kwargs pass through; and every
field that would change the output and is not supported is a 400 naming it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pipeline.serve import api
from pipeline.serve.chat import GENERIC_SYSTEM, chat_messages, chat_prompt
from pipeline.serve.errors import ApiError
from scripted import TOOLS, scripted_model  # noqa: F401 (a fixture)

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
LOOP = [{"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
# the same conversation as chat templates want it
TEMPLATE_FORM = [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": "", "tool_calls": [
                     {"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1",
                  "name": "get_weather"}]


@pytest.fixture(scope="module")
def tokenizers(scripted_model, model_dir):
    from mlx_lm.utils import load_tokenizer

    return {"tools": load_tokenizer(scripted_model),  # hermes template: knows tools
            "chatml": load_tokenizer(model_dir("tiny-llama"))}  # knows none


def parse(tok, **body):
    return api.parse(body, "chat", tok, 4096, 16, len(tok.get_vocab()))


def test_messages_reach_the_template_in_its_form():
    assert chat_messages({"messages": LOOP}) == TEMPLATE_FORM


def test_a_template_that_knows_tools_gets_them_and_the_history(tokenizers):
    tok = tokenizers["tools"]
    req = parse(tok, messages=LOOP, tools=TOOLS)
    want = tok.apply_chat_template(TEMPLATE_FORM, tools=TOOLS, tokenize=False,
                                   add_generation_prompt=True)
    assert '"arguments": {"city": "Paris"}' in want and "sunny, 21 C" in want
    assert '"name": "get_time"' in want  # the tools are in the system prompt
    assert req.prompt == tok.encode(want, add_special_tokens=False)
    chat = req.chat
    assert chat.family.name == "json_tools" and chat.note is None
    assert chat.tools == TOOLS and chat.parallel and not chat.reasoning
    assert parse(tok, messages=LOOP, tools=TOOLS, tool_choice="none").chat.tools is None
    assert not parse(tok, messages=LOOP, tools=TOOLS, parallel_tool_calls=False).chat.parallel


def test_chat_template_kwargs_pass_through(tokenizers):
    tok = tokenizers["tools"]
    on = parse(tok, messages=LOOP[:2])
    off = parse(tok, messages=LOOP[:2], chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(off.prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>")
    assert off.prompt[: len(on.prompt)] == on.prompt and len(off.prompt) > len(on.prompt)
    assert not off.chat.reasoning  # the template closed the block it opened


def test_a_prompt_that_opens_a_think_block_starts_the_answer_as_reasoning():
    from pipeline.serve.families import family_of

    tok = SimpleNamespace(
        chat_template="x", has_thinking=True, think_start="<think>", think_end="</think>",
        apply_chat_template=lambda m, **kw: m[-1]["content"] + "<|assistant|><think>\n",
        encode=lambda text, add_special_tokens: [ord(c) for c in text])
    assert family_of(tok).think == ("<think>", "</think>")
    assert chat_prompt({"messages": [{"role": "user", "content": "hi"}]}, tok).reasoning


def test_a_template_that_ignores_tools_gets_the_generic_form(tokenizers):
    tok = tokenizers["chatml"]
    req = parse(tok, messages=LOOP, tools=TOOLS)
    text = tok.decode(req.prompt)
    described = GENERIC_SYSTEM.format(
        tools="\n".join(json.dumps(t["function"]) for t in TOOLS),
        start="<tool_call>", end="</tool_call>")
    assert text.startswith(f"<|im_start|>system\nBe brief.\n\n{described}<|im_end|>")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    assert req.chat.family.name == "generic" and req.chat.family.call == (
        "<tool_call>", "</tool_call>")
    assert "no tool-call parser is known" in req.chat.note
    # without tools the same template gets the messages untouched (no generic form)
    plain = parse(tok, messages=[LOOP[1]])
    assert plain.chat.note is None and plain.chat.tools is None


BAD = [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ({"tool_choice": {"type": "function", "function": {"name": "get_date"}}, "tools": TOOLS},
     "tool_choice"),  # not one of the tools
    ({"tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "required", "tools": TOOLS, "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}},
     "response_format"),  # a schema llguidance cannot compile
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"12": 5}}, "logit_bias"),
    ({"top_k": 40}, "top_k"),
    ({"repetition_penalty": 1.1}, "repetition_penalty"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"n": 2}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 2}, "logprobs"),  # chat's is a boolean
]


@pytest.mark.parametrize("extra, param", BAD)
def test_refused_fields_name_themselves(tokenizers, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(ApiError) as e:
        parse(tokenizers["tools"], **body)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_accepted_fields(tokenizers):
    tok = tokenizers["tools"]
    req = parse(tok, messages=[{"role": "user", "content": "hi"}], user="u-1", seed=3,
                presence_penalty=0, frequency_penalty=0.0, logit_bias={}, n=1,
                response_format={"type": "text"}, max_completion_tokens=7, store=False,
                metadata={"a": "b"}, stop=["x"], logprobs=True, top_logprobs=4,
                stream_options={"include_usage": True}, stream=True,
                some_future_field={"anything": 1}, reasoning_effort="low")
    assert (req.max_tokens, req.seed, req.stop, req.logprobs) == (7, 3, ["x"], 4)
    assert req.include_usage and req.stream
    assert parse(tok, messages=[{"role": "user", "content": "hi"}], logprobs=True).logprobs == 0
    assert parse(tok, messages=[{"role": "user", "content": "hi"}]).logprobs is None
    completion = api.parse({"prompt": "hi", "logprobs": 3}, "completion", tok, 4096, 16, 600)
    assert completion.logprobs == 3 and completion.chat is None
    for body, param in (({"prompt": "hi", "logprobs": 21}, "logprobs"),
                        ({"prompt": "hi", "echo": True}, "echo"),
                        ({"prompt": "hi", "best_of": 2}, "best_of"),
                        ({"prompt": "hi", "suffix": "end"}, "suffix")):
        with pytest.raises(ApiError) as e:
            api.parse(body, "completion", tok, 4096, 16, 600)
        assert e.value.param == param


def test_a_nan_number_is_refused_not_sampled_with(tokenizers):
    tok = tokenizers["chatml"]
    for field in ("temperature", "top_p"):
        with pytest.raises(ApiError) as e:
            parse(tok, messages=[{"role": "user", "content": "hi"}], **{field: float("nan")})
        assert e.value.status == 400 and field in str(e.value)


def test_a_body_over_the_limit_gets_413_before_it_is_read():
    import asyncio

    from pipeline.serve.http import MAX_BODY_BYTES, make_app

    def post(headers, chunks):
        sent, parts = [], iter(chunks)

        async def receive():
            part = next(parts, None)
            return {"type": "http.request", "body": part or b"", "more_body": part is not None}

        async def send(message):
            sent.append(message)

        asyncio.run(make_app(SimpleNamespace(model="m"))(
            {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": headers, "scheme": "http", "server": ("127.0.0.1", 80)},
            receive, send))
        body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] ==
                                   "http.response.body"))
        return sent[0]["status"], body["error"]

    declared = [(b"content-length", str(MAX_BODY_BYTES + 1).encode())]
    status, error = post(declared, [b"{"])  # refused on the header alone
    assert status == 413 and "at most" in error["message"]
    mib = b" " * 2**20  # no length declared: counted while it streams in
    status, error = post([], [b"{"] + [mib] * 17)
    assert status == 413 and error["code"] == "request_too_large"
    status, error = post([], [b"{not json"])  # a small body is read and parsed as before
    assert status == 400 and "not valid JSON" in error["message"]
