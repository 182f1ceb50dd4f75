"""`python -m pipeline bench --prefix-cache`: agent-like conversations over a shared system
prompt, with the prompt cache and without it, in one job.

The workload (`workload`): --conversations conversations of --turns turns each. Every prompt
starts with the same system text of about --system-tokens tokens; each turn adds a user
message of about --user-tokens tokens to the conversation so far (earlier messages and the
model's answers). The text is resent whole each turn and tokenized again, as a server sees a
client's next turn, so a hit reaches as far as the new tokens equal the cached ones; the
answer resent is a fixed text of plain words about as long as the model's answer (a random
model's answers are byte soup that tokenizes again into ten times the tokens, which a real
model's do not), so the answers themselves are prefilled again and only the rest hits. A
turn's prompts of all conversations run at once (--concurrency at a time,
the engine's continuous batching); the next turn waits for their answers, as agents wait for
the model. Answers are greedy, --gen-tokens long (EOS ignored), so both runs see the same
prompts. Per turn: the time to first token (median over the conversations, counted from the
turn's start, so waiting behind the other prompts' prefills is in it, as a client sees it),
the prompt tokens taken from the cache, and the turn's wall time; the aggregate time is the
turns' sum. The runs alternate off, on, off, on (--repeats pairs) and the medians are
printed with the ratios #26 sets as goals: a later turn's time to first token at most 0.25x
the first turn's, and the aggregate time with the cache at most 0.5x without. The answers
with and without the cache are compared token for token.

The texts are plain words, so launch/bench-cache sends the same workload to mlx-lm's server.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.commands.bench import machine_info
from pipeline.exec.driver import Driver
from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.sampling import SamplingParams

WORDS = ("the of and to in is you that it he was for on are as with his they at be this from "
         "have or by one had not but what all were when we there can an your which their said "
         "if do will each about how up out them then she many some so these would other into "
         "has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words "
         "called just where most know get through back much before go good new write our used "
         "me man too any day same right look think also around another came come work three "
         "word must because does part even place well such here take why things help put years "
         "different away again off went old number great tell men say small every found still "
         "between name should home big give air line set own under read last never us left end "
         "along while might next sound below saw something thought both few those always looked "
         "show large often together asked house world going want school important until form "
         "food keep children feet land side without boy once animals life enough took sometimes "
         "four head above kind began almost live page got earth need far hand high year mother "
         "light parts country father let night following picture being study second eyes soon "
         "times story boys since white days ever paper hard near sentence better best across "
         "during today others however sure means knew its try told young miles sun ways thing "
         "whole hear example heard several change answer room sea against top turned learn point "
         "city play toward five using himself usually").split()


def _text(rng: random.Random, tokenizer, tokens: int) -> str:
    """Plain words, about `tokens` tokens long in this tokenizer."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(max(8, (tokens - len(words)) // 2)))
    while len(words) > 1 and len(tokenizer.encode(" ".join(words),
                                                  add_special_tokens=False)) > tokens:
        words.pop()
    return " ".join(words)


@dataclass
class Workload:
    system: str
    users: list[list[str]]  # per conversation, its user messages in turn order
    answers: list[list[str]]  # per conversation, the answer text resent after each turn

    @property
    def turns(self) -> int:
        return len(self.users[0])


def workload(tokenizer, conversations: int, turns: int, system_tokens: int, user_tokens: int,
             answer_tokens: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    system = "System: " + _text(rng, tokenizer, system_tokens)
    users = [[f"\n\nUser: {_text(rng, tokenizer, user_tokens)}\n\nAssistant:"
              for _ in range(turns)] for _ in range(conversations)]
    answers = [[" " + _text(rng, tokenizer, answer_tokens) for _ in range(turns)]
               for _ in range(conversations)]
    return Workload(system, users, answers)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def run_once(driver: Driver, work: Workload, gen_tokens: int, concurrency: int,
             cache_bytes: int) -> dict:
    """One pass over the workload with a fresh engine (its prompt cache starts empty)."""
    tok = driver.tokenizer
    engine = Engine(driver, concurrency, prompt_cache_bytes=cache_bytes)
    history = [work.system for _ in work.users]  # each conversation's text so far
    turns, answers = [], []
    for t in range(work.turns):
        seqs = []
        for c, users in enumerate(work.users):
            history[c] += users[t]
            seqs.append(Sequence(id=c, prompt=_encode(tok, history[c]), sampling=SamplingParams(
                temp=0.0, max_tokens=gen_tokens, ignore_eos=True)))
        done: list[Sequence] = []
        start = time.perf_counter()
        engine.run(seqs, done.append)
        wall = time.perf_counter() - start
        done.sort(key=lambda s: s.id)
        for seq in done:
            history[seq.id] += work.answers[seq.id][t]
        answers.append([s.tokens for s in done])
        turns.append({"turn": t + 1, "prompt_tokens": sum(len(s.prompt) for s in done),
                      "cached_tokens": sum(s.cached_tokens for s in done),
                      "ttft_s": statistics.median(s.first_token - start for s in done),
                      "wall_s": wall})
    stats = engine.prefixes.stats() if engine.prefixes is not None else None
    return {"turns": turns, "total_s": sum(t["wall_s"] for t in turns), "answers": answers,
            "prompt_cache": stats}


def _median_turns(runs: list[dict]) -> list[dict]:
    out = []
    for t in range(len(runs[0]["turns"])):
        rows = [r["turns"][t] for r in runs]
        out.append({"turn": t + 1, "prompt_tokens": rows[0]["prompt_tokens"],
                    "cached_tokens": rows[0]["cached_tokens"],
                    "ttft_s": statistics.median(r["ttft_s"] for r in rows),
                    "wall_s": statistics.median(r["wall_s"] for r in rows)})
    return out


def run_cache_bench(driver: Driver, conversations: int, turns: int, system_tokens: int,
                    user_tokens: int, gen_tokens: int, concurrency: int, cache_bytes: int,
                    repeats: int, json_out: Path | None, label: str | None = None) -> dict:
    if turns < 2:
        raise ValueError("--turns must be at least 2: a later turn is what the cache speeds up")
    work = workload(driver.tokenizer, conversations, turns, system_tokens, user_tokens,
                    gen_tokens)
    # a warm-up pass of one conversation, so the first timed pass pays no compilation
    run_once(driver, Workload(work.system, work.users[:1], work.answers[:1]), 2, concurrency, 0)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(repeats):
        for mode, size in (("off", 0), ("on", cache_bytes)):
            run = run_once(driver, work, gen_tokens, concurrency, size)
            runs[mode].append(run)
            ttfts = ", ".join(f"{t['ttft_s']:.2f}" for t in run["turns"])
            print(f"bench: prefix cache {mode}, pass {r + 1}/{repeats}: {run['total_s']:.2f} s, "
                  f"time to first token per turn {ttfts} s", file=sys.stderr, flush=True)
    off, on = _median_turns(runs["off"]), _median_turns(runs["on"])
    total_off = statistics.median(r["total_s"] for r in runs["off"])
    total_on = statistics.median(r["total_s"] for r in runs["on"])
    later = max(t["ttft_s"] for t in on[1:])
    results = {
        "label": label, "machine": machine_info(driver), "conversations": conversations,
        "turns": turns, "system_tokens": system_tokens, "user_tokens": user_tokens,
        "gen_tokens": gen_tokens, "concurrency": concurrency, "cache_bytes": cache_bytes,
        "repeats": repeats, "off": off, "on": on, "total_s_off": total_off,
        "total_s_on": total_on, "prompt_cache": runs["on"][-1]["prompt_cache"],
        "later_ttft_ratio": later / on[0]["ttft_s"],  # the goal's: against the same run
        "later_ttft_ratio_vs_off": later / off[0]["ttft_s"],
        "aggregate_ratio": total_on / total_off,
        "same_answers": all(a["answers"] == b["answers"]
                            for a, b in zip(runs["off"], runs["on"])),
    }
    print(markdown(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    return results


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"## bench --prefix-cache: {r['conversations']} conversations x {r['turns']} turns, "
        f"system prompt {r['system_tokens']} tokens, user messages {r['user_tokens']}, answers "
        f"{r['gen_tokens']}, --concurrency {r['concurrency']}, {m.get('ranks', '?')} rank(s), "
        f"medians of {r['repeats']} pass(es)",
        "",
        "| turn | prompt tokens | cached (on) | TTFT off (s) | TTFT on (s) | wall off (s) "
        "| wall on (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(r["off"], r["on"]):
        lines.append(f"| {a['turn']} | {a['prompt_tokens']} | {b['cached_tokens']} | "
                     f"{a['ttft_s']:.3f} | {b['ttft_s']:.3f} | {a['wall_s']:.2f} | "
                     f"{b['wall_s']:.2f} |")
    cache = r["prompt_cache"] or {}
    lines += [
        "",
        f"aggregate: {r['total_s_off']:.2f} s without the cache, {r['total_s_on']:.2f} s with it",
        f"prompt cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses, "
        f"{cache.get('evictions', 0)} evictions, {cache.get('bytes', 0) / 2**20:.1f} MiB held "
        f"(budget {r['cache_bytes'] / 2**20:.0f} MiB per rank)",
        f"answers with and without the cache identical: {'yes' if r['same_answers'] else 'NO'}",
        f"slowest later turn's TTFT / first turn's, both with the cache: "
        f"{r['later_ttft_ratio']:.2f}x (goal <= 0.25x: "
        f"{'met' if r['later_ttft_ratio'] <= 0.25 else 'NOT met'}); against the first turn "
        f"without it: {r['later_ttft_ratio_vs_off']:.2f}x",
        f"aggregate time on / off: {r['aggregate_ratio']:.2f}x "
        f"(goal <= 0.5x: {'met' if r['aggregate_ratio'] <= 0.5 else 'NOT met'})",
    ]
    return "\n".join(lines)
