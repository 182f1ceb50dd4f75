"""The Messages and Responses translations (serve/anthropic.py, serve/responses.py) and the
block sequence they share (serve/blocks.py), in process: request bodies into chat bodies,
refusals, and the streams' event order (the SDKs' parsing of a real stream is in
tests/test_serve_messages.py)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from pipeline.serve import anthropic, blocks, responses
from pipeline.serve.errors import ApiError
from pipeline.serve.job import Piece

TOOL = {"name": "get_weather", "description": "The weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris"}'}


def msgs(*messages, **body):
    return {"max_tokens": 16, "messages": list(messages), **body}


def test_a_messages_body_becomes_the_chat_body_it_means():
    chat = anthropic.to_chat(msgs(
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "look it up", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "timeout"}]},
            {"type": "text", "text": "try again"}]},
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=2"},
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        tools=[TOOL, {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        thinking={"type": "disabled"}, stop_sequences=["END"], temperature=0.5, top_k=0))
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "look it up",
         "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: timeout"},
        {"role": "user", "content": "try again"}]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": TOOL["input_schema"], "description": "The weather"}}]
    assert chat["tool_choice"] == "auto" and chat["parallel_tool_calls"] is False
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    assert (chat["stop"], chat["temperature"], chat["max_tokens"]) == (["END"], 0.5, 16)
    forced = [anthropic.to_chat(msgs({"role": "user", "content": "hi"}, tools=[TOOL],
                                     tool_choice=c))["tool_choice"]
              for c in ({"type": "any"}, {"type": "tool", "name": "get_weather"})]
    assert forced == ["required", {"type": "function", "function": {"name": "get_weather"}}]
    notes = []
    anthropic.to_chat(msgs({"role": "user", "content": "hi"}, tools=[
        TOOL, {"type": "web_search_20250305", "name": "web_search"}]), notes=notes)
    assert notes and "web_search_20250305 'web_search'" in notes[0]  # left out, and said


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    (msgs({"role": "system", "content": "hi"}), "messages[0].role"),
    (msgs({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}),
     "messages[0].content[0].tool_use_id"),
    (msgs({"role": "user", "content": [{"type": "image", "source": {}}]}),
     "messages[0].content[0]"),
    (msgs({"role": "user", "content": [{"type": "video"}]}), "messages[0].content[0]"),
    (msgs({"role": "user", "content": "hi"}, tools=[{"name": "f", "input_schema": []}]),
     "tools[0].input_schema"),
    (msgs({"role": "user", "content": "hi"}, tool_choice={"type": "tool"}), "tool_choice"),
    (msgs({"role": "user", "content": "hi"}, tool_choice="auto"), "tool_choice"),
    (msgs({"role": "user", "content": "hi"}, thinking={"type": "on"}), "thinking"),
    (msgs({"role": "user", "content": "hi"}, system=[{"type": "image"}]), "system"),
    (msgs({"role": "user", "content": "hi"}, {"role": "assistant", "content": "The"}),
     "messages"),
    (msgs({"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}),
     "messages[1].content[0]"),
])
def test_a_bad_messages_body_is_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        anthropic.to_chat(body)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    status, shaped = anthropic.error(e.value)
    assert status == 400 and shaped == {"type": "error", "error": {
        "type": "invalid_request_error", "message": e.value.message}}


def test_anthropic_error_types_and_statuses():
    for ours, status, kind in ((401, 401, "authentication_error"), (404, 404, "not_found_error"),
                               (413, 413, "request_too_large"), (429, 529, "overloaded_error"),
                               (503, 529, "overloaded_error"), (500, 500, "api_error")):
        assert anthropic.error(ApiError(ours, "m")) == (status, {
            "type": "error", "error": {"type": kind, "message": "m"}})


def test_a_responses_body_becomes_the_chat_body_it_means():
    notes = []
    chat = responses.to_chat({
        "instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0,
        "reasoning": {"effort": "low"}, "text": {"format": {"type": "text"}},
        "tool_choice": {"type": "function", "name": "get_weather"},
        "tools": [{"type": "function", "name": "get_weather", "parameters": {}},
                  {"type": "web_search"}, {"type": "namespace", "name": "agents", "tools": []}],
        "input": [
            {"role": "user", "content": "weather?"},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "look it up"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}, notes)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "look it up",
         "tool_calls": [{"id": "c1", "type": "function", "function": {
             "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    assert chat["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                               "parameters": {}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert (chat["max_tokens"], chat["reasoning_effort"], chat["response_format"]) == (
        9, "low", {"type": "text"})
    assert len(notes) == 1 and "web_search" in notes[0] and "namespace 'agents'" in notes[0]
    assert responses.to_chat({"input": "hi"})["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "x", "output": "1"}]},
     "input[0].call_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
     "input[0]"),
    ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
])
def test_a_bad_responses_body_is_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        responses.to_chat(body)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_blocks_open_close_and_number_in_order():
    state = blocks.Blocks()
    steps = state.feed(Piece(reasoning="think", content="Hi"))
    steps += state.feed(Piece(content=" there", calls=[CALL, {**CALL, "id": "call_2"}]))
    steps += state.feed(Piece(content="after")) + state.finish()
    assert [(s.what, s.kind, s.index, s.text) for s in steps] == [
        ("start", "reasoning", 0, ""), ("delta", "reasoning", 0, "think"),
        ("stop", "reasoning", 0, ""), ("start", "text", 1, ""), ("delta", "text", 1, "Hi"),
        ("delta", "text", 1, " there"), ("stop", "text", 1, ""),
        ("start", "call", 2, ""), ("delta", "call", 2, CALL["arguments"]),
        ("stop", "call", 2, ""),
        ("start", "call", 3, ""), ("delta", "call", 3, CALL["arguments"]),
        ("stop", "call", 3, ""),
        ("start", "text", 4, ""), ("delta", "text", 4, "after"), ("stop", "text", 4, "")]
    assert [(b.kind, b.text) for b in state.done] == [
        ("reasoning", "think"), ("text", "Hi there"), ("call", CALL["arguments"]),
        ("call", CALL["arguments"]), ("text", "after")]


def test_pings_come_while_waiting_and_no_piece_is_lost():
    async def slow():
        for i in range(3):
            await asyncio.sleep(0.05 if i == 1 else 0)
            yield i

    async def run():
        return [p async for p in blocks.with_pings(slow(), 0.01)]

    got = asyncio.run(run())
    assert [p for p in got if p is not None] == [0, 1, 2] and None in got
    assert got.index(None) > got.index(0) and got.index(None) < got.index(1)


def fake_job(pieces, finish="tool_calls", engine_reason="stop"):
    async def gen():
        for p in pieces:
            yield p

    return SimpleNamespace(
        pieces=gen, finish_reason=finish, tokens=5, cached_tokens=lambda: 0,
        seq=SimpleNamespace(finish_reason=engine_reason), stops=SimpleNamespace(matched=None),
        req=SimpleNamespace(prompt=[1, 2, 3], temp=0.0, top_p=1.0, max_tokens=8,
                            chat=SimpleNamespace(parallel=True)))


def sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for chunk in text.strip().split("\n\n"):
        kind, data = chunk.split("\n")
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def collected(events):
    return "".join([e async for e in events])


def test_anthropic_stream_grammar_and_the_error_event():
    job = fake_job([Piece(reasoning="r", content="t", calls=[CALL])])
    got = sse(asyncio.run(collected(anthropic.events(job, "msg_1", 0, "m"))))
    assert [k for k, _ in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert all(k == d["type"] for k, d in got)
    assert got[7][1]["content_block"]["id"] == "toolu_abc"
    assert got[8][1]["delta"] == {"type": "input_json_delta", "partial_json": CALL["arguments"]}
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use"
    cut = sse(asyncio.run(collected(anthropic.events(
        fake_job([Piece(content="t")], "stop", "interrupted"), "msg_2", 0, "m"))))
    assert cut[-1] == ("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "the server is shutting down"}})


def test_responses_stream_numbers_its_events_and_ends_completed_or_failed():
    job = fake_job([Piece(reasoning="r", content="t", calls=[CALL])])
    got = sse(asyncio.run(collected(responses.events(job, "resp_1", 0, "m"))))
    assert [d["sequence_number"] for _, d in got] == list(range(len(got)))
    kinds = [k for k, _ in got]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_item.added") == kinds.count(
        "response.output_item.done") == 3
    final = got[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][2]["call_id"] == "call_abc" and final["status"] == "completed"
    cut = sse(asyncio.run(collected(responses.events(
        fake_job([Piece(content="t")], "stop", "interrupted"), "resp_2", 0, "m"))))
    assert cut[-1][0] == "response.failed" and cut[-1][1]["response"]["status"] == "failed"
