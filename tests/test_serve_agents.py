"""`serve` for agents over a real 2-rank mpirun, with the official openai client: tool calls,
reasoning and logprobs from a model that really writes them (tests/scripted.py: a tiny model
whose greedy answer is a think block, a sentence and two calls, their markers and JSON split
across tokens; with enable_thinking false, a sentence and a call that does not parse). Nothing
is stood in for: the tokens come from the pipeline's engine and sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripted import (CALLS, THINKING, TOOLS, scripted_chatml_model,  # noqa: F401 (fixtures)
                      scripted_model)
from test_logprobs import mlx_lm_logprobs
from test_serve import start_server, stop_server

ASK = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]
REASONING, TEXT = "The user wants the weather.", "I will check both cities."
MARKERS = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_", "</th")


@pytest.fixture(scope="module")
def server(scripted_model):
    served = start_server(scripted_model, "--concurrency", "4", "--max-queue", "4")
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def tok(scripted_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(scripted_model)


def chat(server, **kw):
    return server.client().chat.completions.create(model="m", messages=ASK, temperature=0, **kw)


def calls_of(message) -> list:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_tool_calls_and_reasoning_whole(server):
    got = chat(server, tools=TOOLS)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TEXT
    assert choice.message.model_extra["reasoning_content"] == REASONING
    assert calls_of(choice.message) == CALLS
    ids = [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == 2 and all(c.type == "function" for c in choice.message.tool_calls)
    assert got.usage.completion_tokens == 12  # 11 pieces and the EOS


def test_tool_calls_streamed(server):
    content, reasoning, calls, firsts, reasons = [], [], {}, {}, []
    for event in chat(server, tools=TOOLS, stream=True):
        for c in event.choices:
            reasons.append(c.finish_reason)
            d = c.delta
            content.append(d.content or "")
            reasoning.append(d.model_extra.get("reasoning_content") or "")
            for tc in d.tool_calls or []:
                if tc.index not in calls:  # the first delta of a call names it all
                    firsts[tc.index] = (tc.id, tc.type, tc.function.name)
                    calls[tc.index] = ""
                calls[tc.index] += tc.function.arguments or ""
    assert "".join(content) == TEXT and "".join(reasoning) == REASONING
    assert not any(m in piece for piece in content + reasoning for m in MARKERS)
    assert [(firsts[i][2], json.loads(calls[i])) for i in sorted(calls)] == CALLS
    assert all(cid and kind == "function" for cid, kind, _ in firsts.values())
    assert reasons[-1] == "tool_calls" and not any(reasons[:-1])


def test_without_tools_a_call_is_only_text(server):
    choice = chat(server).choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content.startswith(TEXT + "\n<tool_call>\n")
    assert choice.message.model_extra["reasoning_content"] == REASONING  # still split
    none = chat(server, tools=TOOLS, tool_choice="none").choices[0]
    assert none.message.content == choice.message.content and not none.message.tool_calls


def test_a_call_that_does_not_parse_is_reported_not_dropped(server):
    kwargs = {"tools": TOOLS, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    choice = chat(server, **kwargs).choices[0]
    bad = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city"}}\n</tool_call>'
    assert choice.message.content == "Checking." + bad and not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    (error,) = choice.model_extra["tool_call_errors"]
    assert "json_tools tool call that does not parse" in error
    streamed, errors = "", []
    for event in chat(server, stream=True, **kwargs):
        for c in event.choices:
            streamed += c.delta.content or ""
            errors += c.model_extra.get("tool_call_errors") or []
    assert streamed == choice.message.content and errors == [error]
    assert "pipeline: the model wrote a json_tools tool call" in "".join(server.err)


def test_parallel_tool_calls_false_ends_after_the_first_call(server):
    choice = chat(server, tools=TOOLS, parallel_tool_calls=False)
    assert calls_of(choice.choices[0].message) == CALLS[:1]
    assert choice.choices[0].finish_reason == "tool_calls"
    assert choice.usage.completion_tokens < 12


def test_a_tool_loop_sends_calls_and_results_back(server, tok):
    """The calls as the client got them go back in the history (arguments as JSON strings),
    with a tool message per result; the prompt is the template's rendering of them with the
    arguments as objects."""
    first = chat(server, tools=TOOLS).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": f"result {i}"}
        for i, c in enumerate(first.tool_calls)]
    got = server.client().chat.completions.create(model="m", messages=history, tools=TOOLS,
                                                  temperature=0)
    as_template = ASK + [{"role": "assistant", "content": TEXT, "reasoning_content": REASONING,
                          "tool_calls": [{"id": c.id, "type": "function", "function": {
                              "name": c.function.name,
                              "arguments": json.loads(c.function.arguments)}}
                              for c in first.tool_calls]}] + [
        {"role": "tool", "tool_call_id": c.id, "content": f"result {i}",
         "name": c.function.name} for i, c in enumerate(first.tool_calls)]
    text = tok.apply_chat_template(as_template, tools=TOOLS, tokenize=False,
                                   add_generation_prompt=True)
    assert "result 1" in text and '"arguments": {"zone": "CET"}' in text
    assert got.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert calls_of(got.choices[0].message) == CALLS  # the scripted model calls again


def check_logprobs(entries, want, ids, k, tok):
    from pipeline.serve.logprobs import TokenText

    text = TokenText(tok)
    assert len(entries) == len(ids)
    for pos, (e, token) in enumerate(zip(entries, ids)):
        row = want[pos]
        assert bytes(e["bytes"]) == bytes(text(token)[1])
        assert e["logprob"] == pytest.approx(float(row[token]), abs=1e-4), pos
        top = [int(t) for t in np.argsort(-row, kind="stable")[:k]]
        assert [bytes(t["bytes"]) for t in e["top_logprobs"]] == [bytes(text(t)[1]) for t in top]
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(
            [float(row[t]) for t in top], abs=1e-4)


def test_chat_logprobs_equal_mlx_lm(server, tok, scripted_model):
    prompt = tok.encode(tok.apply_chat_template(ASK, tools=TOOLS, tokenize=False,
                                                add_generation_prompt=True),
                        add_special_tokens=False)
    got = chat(server, tools=TOOLS, logprobs=True, top_logprobs=3)
    entries = [e.model_dump() for e in got.choices[0].logprobs.content]
    ids = [tok.convert_tokens_to_ids(p) for p in THINKING]
    want = mlx_lm_logprobs(scripted_model, prompt, ids)
    check_logprobs(entries, want, ids, 3, tok)  # the EOS that ended it is not in the answer
    streamed = []
    for event in chat(server, tools=TOOLS, logprobs=True, top_logprobs=3, stream=True):
        for c in event.choices:
            streamed += [e.model_dump() for e in (c.logprobs.content if c.logprobs else [])]
    assert streamed == entries


def test_completion_logprobs_equal_mlx_lm(server, tok, scripted_model):
    """From a plain prompt the scripted model is a random one: logprobs spread out."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    prompt = "The river wound slowly"
    ids_in = tok.encode(prompt)
    model, _ = load(str(scripted_model))
    ids = [int(t) for t, _ in generate_step(mx.array(ids_in), model, max_tokens=8,
                                            sampler=lambda lp: mx.argmax(lp, axis=-1))]
    want = mlx_lm_logprobs(scripted_model, ids_in, ids)
    assert want.max(axis=1).max() < -0.5, "logprobs this peaked make the check weak"
    client = server.client()
    got = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0,
                                    logprobs=4)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([float(want[i][t]) for i, t in enumerate(ids)],
                                              abs=1e-4)
    assert len(lp.tokens) == len(ids) == 8
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for i, top in enumerate(lp.top_logprobs):
        best = float(np.sort(want[i])[::-1][0])
        assert max(top.values()) == pytest.approx(best, abs=1e-4) and len(top) <= 4
    streamed = [v for e in client.completions.create(
        model="m", prompt=prompt, max_tokens=8, temperature=0, logprobs=4, stream=True)
        for v in (e.choices[0].logprobs.token_logprobs if e.choices[0].logprobs else [])]
    assert streamed == lp.token_logprobs


TIGHT = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {k: {"enum": vals}}, "required": [k],
    "additionalProperties": False}}} for n, k, vals in (("get_weather", "city", ["Paris", "Rome"]),
                                                        ("get_time", "zone", ["CET", "UTC"]))]


def test_a_forced_call_and_a_json_schema_through_the_engine(server):
    """The grammar, applied by the engine at 2 ranks: the scripted answer's sentence after its
    reasoning is refused, so a call comes (schema-valid); a JSON schema gives JSON."""
    got = chat(server, tools=TIGHT, tool_choice="required", parallel_tool_calls=False,
               max_tokens=60).choices[0]
    assert got.finish_reason == "tool_calls" and not got.message.content
    ((name, args),) = calls_of(got.message)
    allowed = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in TIGHT}
    (key, spec), = allowed[name].items()
    assert args == {key: args[key]} and args[key] in spec["enum"]
    named = chat(server, tools=TIGHT, tool_choice={"type": "function", "function": {
        "name": "get_time"}}, parallel_tool_calls=False, max_tokens=60).choices[0]
    assert [n for n, _ in calls_of(named.message)] == ["get_time"]
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    js = chat(server, max_tokens=60, response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": schema}}).choices[0]
    assert json.loads(js.message.content)["answer"] in ("yes", "no")
    assert js.finish_reason == "stop"


def test_refused_fields_over_http(server):
    for extra, param in (({"presence_penalty": 1}, "presence_penalty"),
                         ({"logit_bias": {"5": 100}}, "logit_bias")):
        status, body = server.request("POST", "/v1/chat/completions",
                                      {"messages": ASK, **extra})
        assert status == 400 and body["error"]["param"] == param, body
        assert "not supported" in body["error"]["message"]


@pytest.fixture(scope="module")
def served(scripted_chatml_model):
    """A second server: the scripted model with a ChatML template, which knows no tools."""
    served = start_server(scripted_chatml_model, "--concurrency", "2")
    yield served
    stop_server(served)


def test_a_template_without_tools_gets_the_generic_form(served):
    """The tools are described in a system message with the generic JSON call format (said
    once in the log), and the calls the model writes in it are parsed."""
    client = served.client()
    for _ in range(2):
        got = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0)
        choice = got.choices[0]
        assert calls_of(choice.message) == CALLS and choice.finish_reason == "tool_calls"
        assert choice.message.content == TEXT
    plain = client.chat.completions.create(model="m", messages=ASK, temperature=0)
    assert got.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools' text
    log = "".join(served.err)
    assert log.count("tools are described in a system message with the generic JSON") == 1
    assert "no tool-call parser is known for its chat template" in log


def test_chat_page_shows_the_reasoning_apart(server):
    """The chat page in headless Chromium: a thinking model's reasoning streams into a folded
    "Reasoning" block above the answer, and only the answer goes back in the history."""
    import os

    from test_serve import API_KEY, CHROMIUM, CHROMIUM_ARGS

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#key-form:not([hidden])")
            page.fill("#api-key", API_KEY)
            page.press("#api-key", "Enter")
            page.wait_for_function(
                "document.getElementById('cluster').textContent.includes('2 ranks')")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "64")
            page.fill("#prompt", "What is the weather in Paris?")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
            answer = page.locator(".msg.assistant").last
            assert answer.locator(".reasoning .thought").text_content() == REASONING
            assert answer.locator(".reasoning").get_attribute("open") is None  # folded
            text = answer.locator(".text").text_content()
            assert text.startswith(TEXT) and REASONING not in text and "think>" not in text
            sent = page.evaluate("history")
            assert sent[-1] == {"role": "assistant", "content": text}
        finally:
            browser.close()
