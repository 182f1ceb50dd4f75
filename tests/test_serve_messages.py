"""Anthropic's Messages API and OpenAI's Responses API on `serve` over a real 2-rank mpirun,
through the official `anthropic` and `openai` clients (their own stream accumulators parse
every event), against the scripted model (tests/scripted.py): its greedy answer is a think
block, a sentence and two tool calls, whatever the conversation before the generation prompt,
so each API's blocks/items are checked against the script and each prompt against the chat
template's own tokenization of the same conversation (tokenized here, independently)."""

from __future__ import annotations

import json

import pytest

from scripted import CALLS, TOOLS, scripted_agent_model, scripted_model  # noqa: F401 (fixtures)
from test_serve import API_KEY, start_server, stop_server

REASONING, TEXT = "The user wants the weather.", "I will check both cities."
ASK = "What is the weather in Paris, and the time?"
SYSTEM = "You are a helpful assistant."
TOOLS_A = [{"name": t["function"]["name"], "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"]} for t in TOOLS]
TOOLS_R = [{"type": "function", **t["function"]} for t in TOOLS]


@pytest.fixture(scope="module")
def server(scripted_model):
    served = start_server(scripted_model, "--concurrency", "2", "--max-queue", "2")
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def tok(scripted_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(scripted_model)


def anthropic_client(server, key=API_KEY):
    from anthropic import Anthropic

    return Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def template_ids(tok, messages, tools=TOOLS):
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)


def ask(client, **kw):
    return client.messages.create(model="m", max_tokens=64, system=SYSTEM, tools=TOOLS_A,
                                  messages=[{"role": "user", "content": ASK}],
                                  extra_body={"temperature": 0}, **kw)


def test_messages_create_gives_thinking_text_and_tool_use_blocks(server, tok):
    got = ask(anthropic_client(server))
    assert [b.type for b in got.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert got.content[0].thinking == REASONING and got.content[1].text == TEXT
    assert [(b.name, b.input) for b in got.content[2:]] == CALLS
    assert all(b.id.startswith("toolu_") for b in got.content[2:])
    assert got.stop_reason == "tool_use" and got.stop_sequence is None
    prompt = template_ids(tok, [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": ASK}])
    assert got.usage.input_tokens == len(prompt)
    assert got.usage.output_tokens == 12  # 11 pieces and the EOS
    assert got.id.startswith("msg_") and got.role == "assistant"


def test_messages_stream_accumulates_to_the_same_message(server):
    client = anthropic_client(server)
    kinds = []
    with client.messages.stream(model="m", max_tokens=64, system=SYSTEM, tools=TOOLS_A,
                                messages=[{"role": "user", "content": ASK}],
                                extra_body={"temperature": 0}) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    whole = ask(client)
    assert [b.model_dump(exclude={"id"}) for b in final.content] == [
        b.model_dump(exclude={"id"}) for b in whole.content]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 12
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 4


def test_a_tool_use_loop_and_count_tokens(server, tok):
    """tool_use blocks and tool_result blocks go back; the prompt is the template's rendering
    of the calls and results (count_tokens says the same as the answer's usage)."""
    client = anthropic_client(server)
    first = ask(client)
    uses = [b for b in first.content if b.type == "tool_use"]
    history = [{"role": "user", "content": ASK},
               {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": u.id, "content": f"result {i}"}
                   for i, u in enumerate(uses)]}]
    second = client.messages.create(model="m", max_tokens=64, system=SYSTEM, tools=TOOLS_A,
                                    messages=history, extra_body={"temperature": 0})
    expected = template_ids(tok, [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK},
        {"role": "assistant", "content": TEXT, "reasoning_content": REASONING, "tool_calls": [
            {"type": "function", "function": {"name": n, "arguments": a}} for n, a in CALLS]},
        *({"role": "tool", "content": f"result {i}"} for i in range(2))])
    # Anthropic counts the tokens read from the prompt cache apart (the first turn's are there)
    usage = second.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == len(expected)
    assert usage.cache_read_input_tokens > 0
    counted = client.messages.count_tokens(model="m", system=SYSTEM, tools=TOOLS_A,
                                           messages=history)
    assert counted.input_tokens == len(expected)
    billed = client.messages.count_tokens(
        model="m", tools=TOOLS_A, messages=history,
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=9"},
                {"type": "text", "text": SYSTEM}])
    assert billed.input_tokens == len(expected)  # Claude Code's changing line is dropped


# tools whose every argument is an enum: a forced call's input is checked against them
TIGHT_A = [{"name": n, "description": d, "input_schema": {
    "type": "object", "properties": {k: {"enum": vals}}, "required": [k],
    "additionalProperties": False}} for n, d, k, vals in (
        ("get_weather", "The weather in a city now", "city", ["Paris", "Rome"]),
        ("get_time", "The time in a time zone", "zone", ["CET", "UTC"]))]


@pytest.fixture(scope="module")
def agent_server(scripted_agent_model):
    """The agent script (tests/scripted.py): after a tool result the answer is "Done."."""
    served = start_server(scripted_agent_model)
    yield served
    stop_server(served)


def test_a_forced_tool_use_loop_to_the_answer(agent_server):
    """tool_choice any: the scripted sentence after the reasoning is refused by the grammar,
    so a tool_use comes (its input valid for the schema); its tool_result goes back and the
    model answers (end_turn)."""
    client = anthropic_client(agent_server)
    ask_ = [{"role": "user", "content": ASK}]
    first = client.messages.create(model="m", max_tokens=60, tools=TIGHT_A, messages=ask_,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   extra_body={"temperature": 0})
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content if b.type != "thinking"] == ["tool_use"]
    (use,) = [b for b in first.content if b.type == "tool_use"]
    (spec,) = [t["input_schema"] for t in TIGHT_A if t["name"] == use.name]
    ((key, value),) = use.input.items()
    assert value in spec["properties"][key]["enum"]
    history = [*ask_, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    answer = client.messages.create(model="m", max_tokens=60, tools=TIGHT_A, messages=history,
                                    extra_body={"temperature": 0})
    assert answer.stop_reason == "end_turn"
    assert [(b.type, b.text) for b in answer.content] == [("text", "Done.")]


def test_a_thinking_budget_ends_the_reasoning(server):
    """thinking.budget_tokens 1: the reasoning's one token, then the end marker is forced
    where the script would write it in two pieces, and the script's sentence never comes; a
    budget the reasoning fits in changes nothing."""
    client = anthropic_client(server)
    cut = ask(client, thinking={"type": "enabled", "budget_tokens": 1})
    assert cut.content[0].type == "thinking" and cut.content[0].thinking == REASONING
    assert TEXT not in "".join(b.text for b in cut.content if b.type == "text")
    roomy = ask(client, thinking={"type": "enabled", "budget_tokens": 8})
    assert [b.model_dump(exclude={"id"}) for b in roomy.content] == [
        b.model_dump(exclude={"id"}) for b in ask(client).content]
    status, got = server.request("POST", "/v1/messages", {
        "model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": ASK}],
        "thinking": {"type": "enabled", "budget_tokens": 0}})
    assert status == 400 and "budget_tokens" in got["error"]["message"]


def test_messages_refusals_are_in_anthropics_shape(server):
    import anthropic

    client = anthropic_client(server)
    bad = [
        {"messages": [{"role": "user", "content": ASK}]},  # no max_tokens
        {"max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
        {"max_tokens": 8, "messages": [{"role": "user", "content": ASK}],
         "tools": [{"name": "f", "input_schema": "object"}]},
        {"max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA=="}}]}]},
        {"max_tokens": 8, "messages": [{"role": "user", "content": ASK}],
         "tool_choice": {"type": "tool", "name": "get_date"}, "tools": TOOLS_A},  # no such tool
    ]
    for body in bad:
        status, got = server.request("POST", "/v1/messages", {"model": "m", **body})
        assert status == 400 and got["type"] == "error", (body, got)
        assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(server, key="wrong").messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": ASK}])
    assert ask(client).stop_reason == "tool_use"  # still serving


def test_stop_sequences_and_max_tokens(server):
    client = anthropic_client(server)
    got = client.messages.create(model="m", max_tokens=64, stop_sequences=["check both"],
                                 messages=[{"role": "user", "content": ASK}],
                                 extra_body={"temperature": 0})
    assert got.stop_reason == "stop_sequence" and got.stop_sequence == "check both"
    assert got.content[-1].text == "I will"  # (whitespace before a cut is not sent)
    short = client.messages.create(model="m", max_tokens=2,
                                   messages=[{"role": "user", "content": ASK}],
                                   extra_body={"temperature": 0})
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def respond(server, **kw):
    return server.client().responses.create(model="m", instructions=SYSTEM, input=ASK,
                                            tools=TOOLS_R, temperature=0, **kw)


def test_responses_create_and_stream(server, tok):
    got = respond(server)
    assert [o.type for o in got.output] == ["reasoning", "message", "function_call",
                                            "function_call"]
    assert got.output[0].content[0].text == REASONING and got.output_text == TEXT
    assert [(o.name, json.loads(o.arguments)) for o in got.output[2:]] == CALLS
    assert got.status == "completed" and got.usage.output_tokens == 12
    prompt = template_ids(tok, [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": ASK}])
    assert got.usage.input_tokens == len(prompt)
    deltas = []
    with server.client().responses.stream(model="m", instructions=SYSTEM, input=ASK,
                                          tools=TOOLS_R, temperature=0) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == TEXT and final.output_text == TEXT
    assert [(o.type, getattr(o, "name", None), getattr(o, "arguments", None))
            for o in final.output] == [(o.type, getattr(o, "name", None),
                                        getattr(o, "arguments", None)) for o in got.output]


def test_responses_function_call_loop(server, tok):
    first = respond(server)
    calls = [o for o in first.output if o.type == "function_call"]
    items = [{"role": "user", "content": ASK}, *(o.model_dump(exclude_none=True)
                                                 for o in first.output),
             *({"type": "function_call_output", "call_id": c.call_id, "output": f"result {i}"}
               for i, c in enumerate(calls))]
    second = server.client().responses.create(model="m", instructions=SYSTEM, input=items,
                                              tools=TOOLS_R, temperature=0)
    expected = template_ids(tok, [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK},
        {"role": "assistant", "content": TEXT, "tool_calls": [
            {"type": "function", "function": {"name": n, "arguments": a}} for n, a in CALLS]},
        *({"role": "tool", "content": f"result {i}"} for i in range(2))])
    assert second.usage.input_tokens == len(expected)
    status, got = server.request("POST", "/v1/responses", {
        "model": "m", "input": ASK, "previous_response_id": first.id})
    assert status == 400 and "stores no responses" in got["error"]["message"]
    status, got = server.request("POST", "/v1/responses", {
        "model": "m", "input": [{"type": "function_call_output", "call_id": "x", "output": "1"}]})
    assert status == 400 and got["error"]["param"] == "input[0].call_id"


def test_the_three_apis_read_one_conversation_alike(server):
    """One greedy conversation through chat completions, Messages and Responses: the same
    prompt tokens, the same reasoning, text and calls."""
    chat = server.client().chat.completions.create(
        model="m", temperature=0, tools=TOOLS, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}])
    msg, resp = ask(anthropic_client(server)), respond(server)
    m = chat.choices[0].message
    assert chat.usage.prompt_tokens == resp.usage.input_tokens == (
        msg.usage.input_tokens + msg.usage.cache_read_input_tokens)
    assert m.content == msg.content[1].text == resp.output_text
    assert m.model_extra["reasoning_content"] == msg.content[0].thinking == (
        resp.output[0].content[0].text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
        (b.name, b.input) for b in msg.content[2:]] == [
        (o.name, json.loads(o.arguments)) for o in resp.output[2:]]
    models = server.request("GET", "/v1/models")[1]
    assert models["data"][0]["type"] == "model" and models["data"][0]["object"] == "model"
