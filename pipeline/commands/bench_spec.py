"""`python -m pipeline bench --speculative`: one conversation's decode speed with and without
speculative decoding (prompt lookup), on prompts that copy much of themselves (repeat, fix
typos, rename a variable) and on plain questions.

Each prompt is a fresh one-shot chat (greedy, stops at EOS or --gen-tokens), run without
drafting and with it, alternately, --repeats times after --warmup. Per prompt: the tokens,
the agreement of the drafted text with the plain one (identical tokens before the first
difference / tokens) and, where they differ, how far apart the plain step's two best logits
were there (in units of the dtype's eps x the row's largest |logit|, the unit of the
verification pass's rounding), how many proposals were accepted, tokens per pass round the
ring, and decode tok/s (after the first token, as one-shot reports it) with and without,
medians over the repeats. Per kind (edits, questions): the same summed over its prompts.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from pipeline.commands.bench import machine_info
from pipeline.exec.draft import DraftOptions
from pipeline.exec.driver import Driver
from pipeline.exec.sampling import SamplingParams
from pipeline.model.prompt import encode, wants_chat

PARAGRAPH = ("The river ran low that summer, and the old mill stood silent for the first time "
             "in forty years. Children came down to the banks to look for the stones their "
             "grandparents had talked about, flat grey stones with holes worn clean through "
             "them, and in the evenings the whole village walked along the dry bed as if it "
             "were a road.")
TYPOS = ("Teh meeting has been moved to Thursday becuase the conference room is beeing "
         "painted. Please bring you're laptops and the report we discused last week, and "
         "dont forget to send the agenda to everyone who could not atend.")
CODE = ("def mean(values):\n    x = 0\n    for v in values:\n        x = x + v\n"
        "    return x / len(values)\n\n\ndef spread(values):\n    x = max(values) - "
        "min(values)\n    return x\n")

PROMPTS = [
    ("edit", "repeat", f"Repeat this paragraph exactly:\n\n{PARAGRAPH}"),
    ("edit", "typos", f"Fix the typos in this text and write it out in full:\n\n{TYPOS}"),
    ("edit", "rename", "Rename the variable x to total in this Python code and show the "
                       f"whole code:\n\n{CODE}"),
    ("question", "capital", "What is the capital of France?"),
    ("question", "sky", "Explain in a few sentences why the sky is blue."),
    ("question", "pancakes", "Give me a short recipe for pancakes."),
]


def _one(driver: Driver, ids: list[int], gen_tokens: int, drafting: DraftOptions | None,
         keep_logits: list | None = None):
    driver.reset()  # a fresh conversation: nothing reused from the previous run
    driver.drafting = drafting
    driver.keep_logits = keep_logits  # references only: costs the timed run nothing
    try:
        for _ in driver.generate(ids, SamplingParams(max_tokens=gen_tokens)):
            pass
    finally:
        driver.keep_logits = None
    return driver.last_stats


def agreement(plain: list[int], drafted: list[int], logits: list) -> dict:
    """How far the drafted tokens follow the plain ones: identical tokens before the first
    difference, of the plain run's; where they differ, the plain step's two best logits there
    (logits: its rows [V], one per token) and their gap in units of eps x the row's largest
    |logit| (eps of the logits' dtype), the unit in which the verification pass rounds."""
    same = next((i for i, (a, b) in enumerate(zip(plain, drafted)) if a != b),
                min(len(plain), len(drafted)))
    out = {"identical": same, "of": len(plain), "top2": None, "gap": None, "gap_eps": None}
    if same == len(plain) == len(drafted) or same >= len(logits):
        return out
    row = logits[same]
    top = sorted(mx.topk(row.astype(mx.float32), 2).tolist(), reverse=True)
    unit = float(mx.finfo(row.dtype).eps) * mx.max(mx.abs(row.astype(mx.float32))).item()
    gap = top[0] - top[1]
    out.update(top2=top, gap=gap, gap_eps=gap / unit if unit > 0 else math.inf)
    return out


def run_speculative_bench(driver: Driver, gen_tokens: int, repeats: int, warmup: int,
                          num_draft_tokens: int, json_out: Path | None,
                          label: str | None = None, exact: bool = False) -> dict:
    chat = wants_chat(driver.tokenizer, None)
    rows = []
    for kind, name, text in PROMPTS:
        ids = encode(driver.tokenizer, [{"role": "user", "content": text}], chat)
        tps = {"off": [], "on": []}
        for r in range(warmup + repeats):
            logits: list = []
            off = _one(driver, ids, gen_tokens, None, logits)
            on = _one(driver, ids, gen_tokens,
                      DraftOptions(num_draft_tokens=num_draft_tokens, exact=exact))
            if r >= warmup:
                tps["off"].append(off.generation_tps)
                tps["on"].append(on.generation_tps)
        agree = agreement(off.tokens, on.tokens, logits)
        row = {"kind": kind, "prompt": name, "prompt_tokens": len(ids),
               "tokens": on.generation_tokens, "same_tokens": on.tokens == off.tokens,
               "agreement": agree,
               "passes": on.passes, "drafted": on.drafted, "accepted": on.accepted,
               "acceptance": on.accepted / on.drafted if on.drafted else 0.0,
               "tokens_per_pass": on.generation_tokens / on.passes if on.passes else 0.0,
               "decode_tps_off": statistics.median(tps["off"]),
               "decode_tps_on": statistics.median(tps["on"])}
        rows.append(row)
        print(f"bench: {name}: {row['tokens']} tokens, {row['accepted']}/{row['drafted']} "
              f"accepted, {row['tokens_per_pass']:.2f} tokens per pass, decode "
              f"{row['decode_tps_off']:.1f} -> {row['decode_tps_on']:.1f} tok/s, agreement "
              f"{_agreement_text(agree)}", file=sys.stderr, flush=True)
    driver.drafting = None
    results = {"label": label, "machine": machine_info(driver), "gen_tokens": gen_tokens,
               "num_draft_tokens": num_draft_tokens, "exact": exact,
               "repeats": repeats, "warmup": warmup,
               "speculative": rows, "kinds": [_kind(rows, k) for k in ("edit", "question")]}
    print(markdown(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    return results


def _kind(rows: list[dict], kind: str) -> dict:
    """One kind's prompts together: proposals and tokens summed, decode time summed."""
    mine = [r for r in rows if r["kind"] == kind]
    drafted = sum(r["drafted"] for r in mine)
    decoded = sum(max(0, r["tokens"] - 1) for r in mine)

    def rate(key: str) -> float:
        seconds = sum(max(0, r["tokens"] - 1) / r[key] for r in mine if r[key] > 0)
        return decoded / seconds if seconds else 0.0

    return {"kind": kind, "prompts": len(mine), "tokens": sum(r["tokens"] for r in mine),
            "acceptance": sum(r["accepted"] for r in mine) / drafted if drafted else 0.0,
            "tokens_per_pass": (sum(r["tokens"] for r in mine) / sum(r["passes"] for r in mine)
                                if mine else 0.0),
            "decode_tps_off": rate("decode_tps_off"), "decode_tps_on": rate("decode_tps_on"),
            "same_tokens": all(r["same_tokens"] for r in mine),
            "same_prompts": sum(r["same_tokens"] for r in mine)}


def _agreement_text(a: dict) -> str:
    """'96/96', or '40/96, top-2 gap 0.0312 (2.0 eps x max|logit|)' where the texts differ."""
    text = f"{a['identical']}/{a['of']}"
    if a["gap"] is not None:
        text += f", top-2 gap {a['gap']:.3g} ({a['gap_eps']:.1f} eps x max|logit|)"
    return text


def markdown(results: dict) -> str:
    m = results["machine"]
    mode = "exact (--draft-exact)" if results.get("exact") else "standard"
    lines = [f"ranks {m['ranks']} ({', '.join(m['hosts'])}), device {m['device']}, "
             f"BLAS {m['blas']}, activations {m['activation_dtype']}; speculative decoding "
             f"by prompt lookup, {mode} acceptance, at most {results['num_draft_tokens']} "
             f"proposals per pass; medians of {results['repeats']} runs; agreement: identical "
             f"tokens before the first difference / tokens, and there the plain step's top-2 "
             f"logit gap", "",
             "| prompt | kind | tokens | agreement | accepted / proposed | tokens per pass "
             "| decode tok/s off | on | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["speculative"] + results["kinds"]:
        name = r.get("prompt", f"**all {r['kind']}s**")
        proposed = (f"{r['accepted']} / {r['drafted']}" if "drafted" in r
                    else f"{100 * r['acceptance']:.0f}%")
        agree = (_agreement_text(r["agreement"]) if "agreement" in r
                 else f"{r['same_prompts']} of {r['prompts']} same")
        speedup = r["decode_tps_on"] / r["decode_tps_off"] if r["decode_tps_off"] else 0.0
        lines.append(f"| {name} | {r['kind']} | {r['tokens']} | {agree} | {proposed} | "
                     f"{r['tokens_per_pass']:.2f} | {r['decode_tps_off']:.1f} | "
                     f"{r['decode_tps_on']:.1f} | {speedup:.2f}x |")
    return "\n".join(lines)
