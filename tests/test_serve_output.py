"""The output state machine (pipeline/serve/output.py) over fixture outputs of every tool-call
family serve parses: mlx-lm's parsers (as its tokenizer wrapper picks them from a chat template)
and serve's own (DeepSeek V3/V3.1, V3.2's DSML, the generic JSON format). For each: text before the calls,
two parallel calls fed in every cut (one character at a time, and chunks of 2 to 9), and a
malformed call reported with its text and the reason, never dropped. Pure: no model, no MPI."""

from __future__ import annotations

import importlib
import json
import random
from types import SimpleNamespace

import pytest

from pipeline.serve.families import Family, family_of, generic
from pipeline.serve.output import Output

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {
            "zone": {"type": "string"}}}}}]
CALLS = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "CET"})]
BEFORE = "Let me check."
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"

# family -> (the model's output: BEFORE, then CALLS; an output whose call does not parse)
FIXTURES = {
    "json_tools": (
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
        "</tool_call>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'),
    "qwen3_coder": (
        "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
        "<function=get_time>\n<parameter=zone>\nCET\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<get_weather city=Paris>\n</tool_call>"),
    "glm47": (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call><tool_call>get_time\n"
        "<arg_key>zone</arg_key>\n<arg_value>CET</arg_value>\n</tool_call>",
        "<tool_call>the weather please</tool_call>"),  # glm47 names it "unknown"
    "kimi_k2": (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris", "days": 3}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>"
        '{"zone": "CET"}<|tool_call_end|><|tool_calls_section_end|>',
        "<|tool_calls_section_begin|><|tool_call_begin|>get_weather<|tool_call_end|>"
        "<|tool_calls_section_end|>"),
    "mistral": (  # no end marker: the calls run to the end of the answer
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}'
        '[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
        '[TOOL_CALLS]get_weather[ARGS]{"city": '),
    "minimax_m2": (
        '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris'
        '</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n<invoke name="get_time">'
        '\n<parameter name="zone">CET</parameter>\n</invoke>\n</minimax:tool_call>',
        "<minimax:tool_call>\nget_weather Paris\n</minimax:tool_call>"),
    "pythonic": (
        '<|tool_call_start|>[get_weather(city="Paris", days=3), get_time(zone="CET")]'
        "<|tool_call_end|>",
        "<|tool_call_start|>[get_weather(city=]<|tool_call_end|>"),
    "gemma4": (
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
        '<|tool_call>call:get_time{zone:<|"|>CET<|"|>}<tool_call|>',
        "<|tool_call>call:get_weather{city:<tool_call|>"),
    "function_gemma": (
        "<start_function_call>call:get_weather{city:<escape>Paris<escape>,days:3}"
        "<end_function_call><start_function_call>call:get_time{zone:<escape>CET<escape>}"
        "<end_function_call>",
        "<start_function_call>get_weather<end_function_call>"),
    "minicpm5": (
        '<function name="get_weather"><param name="city">Paris</param><param name="days">3'
        '</param></function><function name="get_time"><param name="zone">CET</param></function>',
        "<function name=></function>"),
    "deepseek_v3": (  # V3.1
        f"{DS_BEGIN}{DS_CALL}get_weather{DS_SEP}" '{"city": "Paris", "days": 3}'
        f"{DS_CALL_END}{DS_CALL}get_time{DS_SEP}" '{"zone": "CET"}' f"{DS_CALL_END}{DS_END}",
        f"{DS_BEGIN}{DS_CALL}get_weather{DS_SEP}" '{"city": ' f"{DS_CALL_END}{DS_END}"),
    "deepseek_v3-v3": (  # V3 (0324): "function", then the name and a fenced JSON block
        f"{DS_BEGIN}{DS_CALL}function{DS_SEP}get_weather\n```json\n"
        '{"city": "Paris", "days": 3}\n```' f"{DS_CALL_END}{DS_CALL}function{DS_SEP}get_time"
        '\n```json\n{"zone": "CET"}\n```' f"{DS_CALL_END}{DS_END}",
        f"{DS_BEGIN}{DS_CALL}function{DS_SEP}get_weather\n```json\n" '{"city"\n```'
        f"{DS_CALL_END}{DS_END}"),
    "deepseek_v32": (  # DSML tags; string="false": a JSON value
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="get_time">\n<｜DSML｜parameter name="zone" string="true">CET'
        "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter '
        'name="days" string="false">three</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜function_calls>"),
}


def _family(name: str) -> Family:
    if name == "deepseek_v32":
        tok = SimpleNamespace(chat_template="... <｜DSML｜function_calls> ...", has_thinking=False)
        return family_of(tok)
    if name.startswith("deepseek_v3"):
        tok = SimpleNamespace(chat_template=f"... {DS_BEGIN} ...", has_thinking=False)
        return family_of(tok)
    if name == "generic":
        return generic(Family("none"))
    mod = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    tok = SimpleNamespace(has_thinking=False, has_tool_calling=True,
                          tool_parser=mod.parse_tool_call, tool_call_start=mod.tool_call_start,
                          tool_call_end=mod.tool_call_end)
    return family_of(tok)


def run(out: Output, text: str, cuts) -> list:
    events, i = [], 0
    for n in cuts:
        events += out.feed(text[i : i + n])
        i += n
    events += out.feed(text[i:]) + out.finish()
    return events


def cuts_of(text: str, seed: int) -> list[int]:
    if seed == 0:
        return [1] * len(text)
    rng = random.Random(seed)
    return [rng.randint(2, 9) for _ in range(len(text))]


def summary(events):
    content = "".join(e.text for e in events if e.kind in ("content", "bad_call"))
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    calls = [(c["name"], json.loads(c["arguments"])) for e in events if e.kind == "call"
             for c in e.calls]
    errors = [e.error for e in events if e.kind == "bad_call"]
    return content, reasoning, calls, errors


FAMILIES = [*FIXTURES, "generic"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_calls_in_any_cut(name, seed):
    family = _family(name)
    text = BEFORE + FIXTURES["json_tools" if name == "generic" else name][0]
    content, reasoning, calls, errors = summary(
        run(Output(family, TOOLS, calls=True), text, cuts_of(text, seed)))
    assert (content, reasoning, errors) == (BEFORE, "", [])
    assert calls == CALLS


@pytest.mark.parametrize("name", FAMILIES)
def test_a_malformed_call_is_reported_with_its_text(name):
    family = _family(name)
    bad = FIXTURES["json_tools" if name == "generic" else name][1]
    events = run(Output(family, TOOLS, calls=True), BEFORE + "\n" + bad, [1] * 5)
    content, _, calls, errors = summary(events)
    assert calls == [] and len(errors) == 1
    assert content == BEFORE + "\n" + bad  # nothing dropped: the text as the model wrote it
    assert f"a {family.name} tool call that does not parse" in errors[0]


def test_without_tools_call_markers_are_plain_text():
    text = BEFORE + FIXTURES["json_tools"][0]
    content, _, calls, errors = summary(run(Output(_family("json_tools")), text, [3] * 99))
    assert content == text and calls == [] and errors == []


THINK = Family("qwen3", ("<think>", "</think>"), ("<tool_call>", "</tool_call>"),
               _family("json_tools").parse)


@pytest.mark.parametrize("seed", [0, 3])
def test_reasoning_then_text_then_a_call(seed):
    text = ("<think>\nThe user asks for the weather.\n</think>\n\n" + BEFORE
            + FIXTURES["json_tools"][0])
    content, reasoning, calls, _ = summary(
        run(Output(THINK, TOOLS, calls=True), text, cuts_of(text, seed)))
    assert (content, reasoning, calls) == (BEFORE, "The user asks for the weather.", CALLS)


def test_a_prompt_that_opened_reasoning():
    """A template that ends its prompt with <think> (DeepSeek-R1 style): the answer starts as
    reasoning, and only </think> ends it."""
    text = "Hmm, Paris.\n</think>\n\nIt is sunny."
    content, reasoning, _, _ = summary(run(Output(THINK, reasoning=True), text, [1] * 99))
    assert (content, reasoning) == ("It is sunny.", "Hmm, Paris.")
    content, reasoning, _, _ = summary(run(Output(THINK), text, [1] * 99))
    assert (content, reasoning) == ("Hmm, Paris.\n</think>\n\nIt is sunny.", "")


def test_plain_text_is_kept_exactly_and_held_only_while_it_may_be_a_marker():
    out = Output(THINK, TOOLS, calls=True)
    assert [e.text for e in out.feed("  Hello <")] == ["  Hello"]
    assert [e.text for e in out.feed("b>\n")] == [" <b>"]  # "<" was not a marker after all
    assert [e.text for e in out.feed(" <tool")] == []
    assert [e.text for e in out.feed("s> x\n\n")] == ["\n <tools> x"]
    assert [e.text for e in out.finish()] == ["\n\n"]  # an answer without markers: exact


def test_an_answer_cut_inside_a_call_says_so():
    text = BEFORE + '<tool_call>\n{"name": "get_weather", "argu'
    out = Output(THINK, TOOLS, calls=True)
    events = out.feed(text) + out.finish("length")
    content, _, calls, errors = summary(events)
    assert content == text and calls == []
    assert "no </tool_call> came (cut off by max_tokens)" in errors[0]


def test_a_call_to_a_tool_not_offered_is_reported():
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    _, _, calls, errors = summary(run(Output(THINK, TOOLS, calls=True), text, [4] * 20))
    assert calls == [] and "'rm_rf', which is not one of the request's tools" in errors[0]


def test_family_of_reads_mlx_lms_inference():
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    hermes = SimpleNamespace(chat_template="{{ '<tool_call>' }}{{ tool_call.name }}",
                             get_vocab=dict)
    assert _infer_tool_parser(hermes) == "json_tools"
    assert _family("json_tools").name == "json_tools"
    none = family_of(SimpleNamespace(chat_template="{{ messages }}", has_thinking=True,
                                     think_start="<think>", think_end="</think>"))
    assert none.call is None and none.think == ("<think>", "</think>")
    assert generic(none).call == ("<tool_call>", "</tool_call>") and generic(none).think


# gpt-oss (harmony): channels, not markers. The prompt ends with <|start|>assistant; <|call|>
# and <|return|> are EOS tokens, so the text ends before them (one call per answer).
HARMONY = Family("harmony", None, ("<|channel|>commentary to=functions.", "<|call|>"))
ANALYSIS = "<|channel|>analysis<|message|>Need the weather: call get_weather.<|end|>"


@pytest.mark.parametrize("header", [
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json",
    "<|start|>assistant to=functions.get_weather<|channel|>commentary json"])
@pytest.mark.parametrize("seed", [0, 4])
def test_harmony_reasoning_then_a_call(header, seed):
    from pipeline.serve.harmony import HarmonyOutput

    text = ANALYSIS + header + '<|message|>{"city": "Paris", "days": 3}'
    content, reasoning, calls, errors = summary(
        run(HarmonyOutput(HARMONY, TOOLS, calls=True), text, cuts_of(text, seed)))
    assert (content, reasoning, errors) == ("", "Need the weather: call get_weather.", [])
    assert calls == CALLS[:1]


def test_harmony_final_answer_preamble_and_a_bad_call():
    from pipeline.serve.harmony import HarmonyOutput

    text = (ANALYSIS + "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.")
    content, reasoning, calls, _ = summary(run(HarmonyOutput(HARMONY, TOOLS, calls=True),
                                               text, [1] * 999))
    assert (content, reasoning, calls) == ("Checking.It is sunny in Paris.",
                                           "Need the weather: call get_weather.", [])
    bad = "<|start|>assistant<|channel|>commentary to=functions.get_weather json<|message|>{ci"
    events = run(HarmonyOutput(HARMONY, TOOLS, calls=True), ANALYSIS + bad, [3] * 99)
    content, _, calls, errors = summary(events)
    assert calls == [] and content == bad and "harmony tool call that does not parse" in errors[0]
    # without tools a message to a function is content (its header is not)
    content, _, calls, _ = summary(run(HarmonyOutput(HARMONY), ANALYSIS + bad, [5] * 99))
    assert (content, calls) == ("{ci", [])


def test_harmony_is_found_from_the_template():
    tok = SimpleNamespace(chat_template="{{ '<|start|>assistant<|channel|>final<|message|>' }}",
                          has_thinking=False)
    family = family_of(tok)
    assert family.name == "harmony" and family.call is not None  # not the generic form
